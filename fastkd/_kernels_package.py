"""``fastkd.kernels`` is the top-level ``kernels/`` folder of the checkout (setuptools ``package-dir``).

The folder has no ``__init__.py``: a regular package named ``kernels`` in the checkout root would
shadow Hugging Face's ``kernels`` (which transformers imports) for anything run from there, since
``python -m pytest`` and ``python -c`` put the current folder first on ``sys.path``. A folder
without ``__init__.py`` is only a namespace portion, which Python uses when no installed package
of that name exists. A regular install copies the folder to ``fastkd/kernels/``, where Python
finds it as a namespace subpackage; setuptools' editable finder maps only packages with an
``__init__.py``, so for an editable install the subpackage is registered here, pointing at the
folder beside ``fastkd/``. See docs/architecture.md.
"""
import importlib.machinery
import importlib.util
import os
import sys

NAME = "fastkd.kernels"


def register_kernels_package():
    if NAME in sys.modules or importlib.util.find_spec(NAME) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if not os.path.isdir(folder):
        return  # an install without the kernels: importing one raises ModuleNotFoundError as usual
    spec = importlib.machinery.ModuleSpec(NAME, None, is_package=True)
    spec.submodule_search_locations = [folder]
    sys.modules[NAME] = importlib.util.module_from_spec(spec)
