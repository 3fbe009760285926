"""The H200 time model (a model: nothing here is measured).

    modelled time = max(bytes requested / copy bandwidth,
                        MUFU ops / MUFU rate,
                        warp-instructions / issue rate)
    floor         = least bytes a fused step must move (fastkd.bench.min_bytes, fwd+bwd) / bandwidth

A kernel that splits a row over a thread-block cluster also waits at its cluster barriers; that
cost is an assumption, not a measurement, and is shown beside the modelled time, never inside it:
    cluster cost = rows x CTAs a row / SMs x cluster barriers a row x CLUSTER_BARRIER_SECONDS
(each barrier stalls its CTA for CLUSTER_BARRIER_SECONDS and nothing on the SM hides it: the
resident kernel's registers leave room for one or two CTAs an SM).

The bytes are DRAM bytes: those requested, less the modelled L2 hits of passes that re-read a
row (``l2_hit_fraction``): with R rows in flight (CTAs resident per SM, from registers and threads,
times the SMs), each row's share of the L2 is L2 / R, and a row keeps its most recently read bytes
there (reads a later pass repeats are "evict_last", the last pass's "evict_first"). A re-read pass
that starts where the previous pass ended (passes alternating in direction) finds
min(1, share / bytes of the row per pass) of its reads in L2; one that starts over at the row's
beginning finds them only when the whole row fits its share (LRU evicts the beginning first).
The three limits are taken as if they never overlap badly nor stall each other: the model is a
lower bound on the time of the code as compiled, not a prediction of a measurement.
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


def rows_in_flight(registers, num_warps, machine=H200):
    """Rows processed at once when each CTA takes one row: resident CTAs per SM times the SMs."""
    threads = 32 * num_warps
    per_sm = min(machine.registers_per_sm // max(1, registers * threads), machine.threads_per_sm // threads,
                 machine.ctas_per_sm)
    return max(1, per_sm) * machine.sms


def l2_hit_fraction(row_bytes_per_pass, rows, alternating, machine=H200):
    """Modelled fraction of a re-read pass's bytes found in L2 (module docstring)."""
    share = machine.l2_bytes / rows
    if alternating:
        return min(1.0, share / row_bytes_per_pass)
    return 1.0 if share >= row_bytes_per_pass else 0.0


# Assumed: ~500 cycles at 1.98 GHz for a cluster barrier's round trip (the compiler puts a
# MEMBAR.ALL.GPU before each arrive). Not measured. With it the model's clustered kl at V = 128256
# (16 CTAs a row, 7 barriers) runs at 57 % of its speed without; upstream Triton's multi-CTA
# softmax tutorial measured 66 % (16 CTAs: 4.7 TB/s against 7.1 for one CTA, on Blackwell).
CLUSTER_BARRIER_SECONDS = 0.25e-6


def cluster_seconds(rows, ctas, barriers_per_row, machine=H200):
    """The assumed cost of the cluster barriers of ``rows`` rows, each split over ``ctas`` CTAs."""
    if ctas <= 1:
        return 0.0
    return rows * ctas / machine.sms * barriers_per_row * CLUSTER_BARRIER_SECONDS


def floor_seconds(floor_bytes, machine=H200):
    return floor_bytes / machine.bandwidth
