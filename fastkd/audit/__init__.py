"""``fastkd audit``: what the compiler makes of the kernels, for a GPU this machine need not have.

For each case of ``cases.CASES`` (one training step of a loss: its forward kernels, then the
backward's ``scale_rows``), at each V:

1. compile (``cubin.py``): the real launchers run on CPU tensors while Triton's own binder
   specialises and compiles every launch for ``sm_<arch>`` (sm_90, the H200, by default);
2. SASS (``sass.py``): registers, spills and whether one sits in a loop, shared memory, and for each
   main loop (a loop over the row, ``range(..., BLOCK_V)``, that loads) its widest load and what one
   iteration executes: instructions, MUFU ops, barriers, shuffles;
3. bytes (``traffic.py``): every load and store lane counted by the Triton interpreter on the
   same launch path, per element of the ``[N, V]`` inputs;
4. model (``model.py``): a modelled H200 time, max(bytes / bandwidth, MUFU ops / MUFU rate,
   warp-instructions / issue rate), and its fraction of the fwd+bwd floor;
5. report (``report.py``): a CSV (one row per kernel and one per step) and a Markdown table.

Per element, with a main loop covering BLOCK_V elements per source iteration, run by num_warps warps
(the launchers' heuristic: 16 warps and BLOCK_V = 4096 for long rows, so 8 elements per thread):
    warp-instructions / element = body instructions / unroll x num_warps / BLOCK_V
    MUFU ops / element          = body MUFU instructions / unroll x 32 x num_warps / BLOCK_V
(each warp issues the body once per SASS iteration, which covers ``unroll`` source iterations; a
MUFU instruction is 32 lane operations, the unit of the MUFU rate). Code outside the main loops runs
once per row and is left out. Every modelled figure is labelled as a model in the outputs.

``tests/test_audit.py`` is the CI gate built on it.
"""
