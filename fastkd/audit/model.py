"""The H200 time model (a model: nothing here is measured).

Per launched kernel, with the counts the audit reads from the SASS and the interpreter:

    CTAs per SM  = min(65536 // (registers rounded up to 8 x threads), 2048 // threads, 32)
    padded elements = N x (V rounded up to what a program iterates over: BLOCK_V for a looping kernel,
                      the CTA's tile x CTAs for a row-resident one); masked lanes load nothing but issue
    overlapped   = max(DRAM bytes / copy bandwidth,
                       MUFU lane-ops of the padded elements / MUFU rate,
                       warp-instructions of the padded elements / (issue rate x ISSUE_EFFICIENCY))
    one CTA a SM, no loop (row-resident, clustered): nothing hides one phase behind another, so
                   waves x (DRAM latency + the CTA's loads at its SM's share of the bandwidth
                            + its instructions at the SM's issue rate x ISSUE_EFFICIENCY
                            + cluster barriers x CLUSTER_BARRIER_SECONDS
                            + its stores at the SM's share + DRAM latency for the fence after them)
    one CTA a SM, looping: overlapped + waves x passes x DRAM latency (each pass of a row starts cold)
    modelled time = the applicable one of these, summed over the step's kernels
    floor         = least bytes a fused step must move (fastkd.bench.min_bytes, fwd+bwd) / bandwidth

The DRAM bytes are those requested less the modelled L2 hits of passes that re-read a row
(``l2_hit_fraction``): with R rows in flight (CTAs resident per SM times the SMs, over CTAs a row),
each row's share of the L2 is L2 / R, and a row keeps its most recently read bytes there. A re-read
pass that starts where the previous pass ended (passes alternating in direction) finds
min(1, share / bytes of the row per pass) of its reads in L2; one that starts over finds them only
when the whole row fits its share. The hits are a model too: every time is also given with no
hit at all (``l2=False``), the bound a first GPU run checks.

Assumed constants, none measured (bench/gpu_check.sh reads the ones a profiler can):
ISSUE_EFFICIENCY 0.75 (a warp scheduler of these loops waits on dependent FP/MUFU results and on
loads a quarter of its cycles: the usual share for memory-bound elementwise SASS at 8-16 warps per
SM), DRAM_LATENCY_SECONDS 0.7 µs (a first load of an H100/H200 CTA), CLUSTER_BARRIER_SECONDS 0.25 µs.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    name: str
    bandwidth: float          # bytes / s, device-to-device copy
    sms: int
    clock: float              # Hz
    mufu_per_clock: int       # MUFU lane-ops per clock per SM
    issue_per_clock: int      # warp-instructions issued per clock per SM (one per scheduler)
    l2_bytes: float = 50e6
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    ctas_per_sm: int = 32

    @property
    def mufu_rate(self):
        return self.mufu_per_clock * self.sms * self.clock

    @property
    def issue_rate(self):
        return self.issue_per_clock * self.sms * self.clock


H200 = Machine("H200", bandwidth=4.3e12, sms=132, clock=1.98e9, mufu_per_clock=16, issue_per_clock=4)


def modelled_seconds(elements, bytes_per_element, mufu_per_element, instructions_per_element, machine=H200):
    """(modelled seconds, which limit binds: "bytes" | "MUFU" | "issue") for ``elements`` elements."""
    limits = {
        "bytes": elements * bytes_per_element / machine.bandwidth,
        "MUFU": elements * mufu_per_element / machine.mufu_rate,
        "issue": elements * instructions_per_element / machine.issue_rate,
    }
    bound = max(limits, key=limits.get)
    return limits[bound], bound


ISSUE_EFFICIENCY = 0.75
DRAM_LATENCY_SECONDS = 0.7e-6
REGISTER_GRANULE = 8  # registers are allocated per thread in multiples of 8 (256 a warp)


def ctas_per_sm(registers, num_warps, machine=H200):
    """CTAs of ``num_warps`` warps and ``registers`` registers a thread that one SM holds at once."""
    threads = 32 * num_warps
    allocated = -(-max(1, registers) // REGISTER_GRANULE) * REGISTER_GRANULE
    return max(1, min(machine.registers_per_sm // (allocated * threads), machine.threads_per_sm // threads,
                      machine.ctas_per_sm))


def rows_in_flight(registers, num_warps, ctas_per_row=1, machine=H200):
    """Rows processed at once: resident CTAs per SM times the SMs, over the CTAs a row takes."""
    return max(1, ctas_per_sm(registers, num_warps, machine) * machine.sms // ctas_per_row)


@dataclass(frozen=True)
class KernelWork:
    """One kernel's share of a step, per element of the ``[N, V]`` inputs."""
    rows: int
    v: int
    padded_v: int               # elements a row's programs iterate over (masked lanes included)
    loaded: float               # bytes requested per element
    stored: float
    l2_hit_bytes: float         # of ``loaded``, modelled as L2 hits
    mufu: float                 # MUFU lane-ops per iterated element
    instructions: float         # warp-instructions per iterated element
    ctas_per_sm: int
    ctas_per_row: int = 1
    passes: int = 1
    loop_free: bool = False
    cluster_barriers: int = 0


def kernel_seconds(work, l2=True, machine=H200):
    """(modelled seconds, what binds: "bytes" | "MUFU" | "issue" | "phases") of one kernel."""
    dram = work.loaded + work.stored - (work.l2_hit_bytes if l2 else 0.0)
    iterated = work.rows * work.padded_v
    limits = {"bytes": work.rows * work.v * dram / machine.bandwidth,
              "MUFU": iterated * work.mufu / machine.mufu_rate,
              "issue": iterated * work.instructions / (machine.issue_rate * ISSUE_EFFICIENCY)}
    bound = max(limits, key=limits.get)
    if work.ctas_per_sm > 1 or dram == 0:
        return limits[bound], bound
    waves = -(-work.rows * work.ctas_per_row // machine.sms)
    if not work.loop_free:
        return limits[bound] + waves * work.passes * DRAM_LATENCY_SECONDS, bound
    sm_bandwidth, sm_clock = machine.bandwidth / machine.sms, machine.clock
    per_cta_v, per_cta_padded = work.v / work.ctas_per_row, work.padded_v / work.ctas_per_row
    loads = DRAM_LATENCY_SECONDS + per_cta_v * (work.loaded - (work.l2_hit_bytes if l2 else 0.0)) / sm_bandwidth
    compute = max(per_cta_padded * work.instructions / (machine.issue_per_clock * sm_clock * ISSUE_EFFICIENCY),
                  per_cta_padded * work.mufu / (machine.mufu_per_clock * sm_clock))
    barriers = work.cluster_barriers * CLUSTER_BARRIER_SECONDS
    stores = per_cta_v * work.stored / sm_bandwidth + DRAM_LATENCY_SECONDS
    return waves * (loads + compute + barriers + stores), "phases"


def l2_hit_fraction(row_bytes_per_pass, rows, alternating, machine=H200):
    """Modelled fraction of a re-read pass's bytes found in L2 (module docstring)."""
    share = machine.l2_bytes / rows
    if alternating:
        return min(1.0, share / row_bytes_per_pass)
    return 1.0 if share >= row_bytes_per_pass else 0.0


# Assumed: ~500 cycles at 1.98 GHz for a cluster barrier's round trip (the compiler puts a
# MEMBAR.ALL.GPU before each arrive). Not measured.
CLUSTER_BARRIER_SECONDS = 0.25e-6


def floor_seconds(floor_bytes, machine=H200):
    return floor_bytes / machine.bandwidth
