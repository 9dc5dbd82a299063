"""One simulated canary deployment: a service model driven by traffic, with faults on the canary.

The model, per group (baseline, canary) and step (all arrays [2, T], vectorised in numpy):

* traffic per pod `lam` = service base rate × diurnal cycle (UTC hour, per-service peak) ×
  a shared slow AR(1) traffic mix × a per-group load-balancer imbalance × per-step Student-t
  noise; both groups see the same diurnal phase and mix.
* CPU follows load: demand = idle + cpu_per_req × lam (+ a hot loop); utilisation
  `rho` = demand / (0.9 × cpu limit); measured `app_cpu` is throttled at the limit.
* latency quantile q = fixed downstream part d_q + service time × (−ln(1−q)) / (1 − rho): the
  M/M/1 sojourn-time quantile, so latency grows sharply as utilisation approaches 1.
* requests per step are Poisson(lam × pods × step); errors are Binomial(requests, p) with p =
  base ratio + fault terms + a saturation term; `error_rate` = errors / requests.
* memory = base + in-flight buffers + a GC sawtooth whose period shortens with load (+ a leak,
  with OOM restarts at the memory limit).
* node metrics: node_cpu = other tenants + app CPU / node cores; node_memory likewise; load1 is
  a 1-minute EMA of runnable + D-state work; net rx/tx follow request rate × payload sizes;
  disk_io follows requests × IO per request; storage_latency follows disk utilisation.
* observation: Student-t (heavy-tailed) multiplicative noise, ~1 % missed scrapes per scrape
  target (app and node exporter) that become missing rows or NaN rows, and rare single-point
  glitches (spikes or drops) on either group.

Faults act on the canary only, from `fault_onset`, along a progress curve `prog = g^k`
(k in [1, 2]) of a linear progress `g`, scaled so that in the noise-free model the driven SLO
metric reaches its SLO at prog = 1. Each fault has one of three onset styles
(`SimulatedDeployment.onset_style`, the bundle's `fault_onset_style` column):

* `mid_run`: onset at a point of `SimParams.onset_window`; `g = (t − onset) / breach_after`,
  with `breach_after` log-uniform in `SimParams.breach_after_s`, so some faults breach quickly,
  some slowly and some never within the window;
* `from_start_ramp`: the same ramp with onset = the deployment's start (first sample);
* `from_start_step`: a bad release: onset = the start and the canary is worse from its first
  sample: `prog` jumps to `level` (uniform in `SimParams.step_level`, in units of the SLO
  headroom: ≥ 1 breaches at once, below 1 it does not yet) and `g` then grows by `drift` per
  hour (`SimParams.step_drift_per_h`), so some steps breach at once, some later and some never.

A share `SimParams.from_start_share` of faults is from the start, of which
`from_start_step_share` are steps, spread evenly over the corpus (`plan_onset_style`). Every
fault draws its mid-run onset, ramp and step values whatever its style, so the service, noise
and fault size do not depend on the style. The families keep their mechanics in every style (a
mem_leak step is a larger heap from the start that then leaks; it never starts past the OOM
limit). Precursors come first where they exist in reality (memory before GC latency, CPU before
queueing latency, storage latency before request latency). Healthy variants are unaffected by
the onset styles: `benign_shift` (a canary that uses a bit more CPU and memory from the start)
and the per-group node differences are the healthy from-start differences.

Labels are computed, not asserted: `breach_index` is the first step at which any SLO metric of
the catalog breaches on the generated (noisy, gappy, glitchy) canary series and still breaches
at the next step. A breach must hold for 2 consecutive grid steps, so a single-point glitch is
never user impact; a NaN (missed scrape) never breaches and breaks a run. `fault_onset` is the
first sample's time for a from-start fault; `impact_at` is the computed breach (at the first
sample for a step past the SLO, None when the canary never breaches: still labelled faulty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.signal import lfilter

from canaryml.catalog import Catalog, Direction
from canaryml.errors import ConfigError
from canaryml.simulate.params import FAMILIES, ONSET_STYLES, SimParams, label_of

SIM_METRICS: tuple[str, ...] = (
    "request_rate", "error_rate", "latency_p50", "latency_p95", "latency_p99", "app_cpu",
    "app_memory", "node_cpu", "node_memory", "net_rx", "net_tx", "disk_io", "storage_latency",
    "load1",
)
APP_TARGET = SIM_METRICS[:7]  # scraped from the pod; the rest from the node exporter
BREACH_RUN = 2  # consecutive steps a breach must hold to count as user impact
_M = {name: i for i, name in enumerate(SIM_METRICS)}
_Q = (0.5, 0.95, 0.99)
_QLOG = tuple(-math.log(1 - q) for q in _Q)
_RHO_KNEE = 0.97
_RHO_MAX = 1.2  # past this, load shedding and timeouts bound the queue
_LAT_TOP_S = 10.0  # top finite histogram bucket: histogram_quantile never reports more
_PROG_MAX = 3.0  # a fault saturates at 3× the SLO headroom (client timeouts, caps, OOM)
# fallbacks when the catalog has no SLO for a metric the fault families aim at
_DEFAULT_SLO = {"latency_p99": 1.0, "error_rate": 0.05, "app_memory": 1.9e9}


@dataclass(frozen=True)
class SimulatedDeployment:
    """One deployment as wide arrays, both groups on one grid.

    `canary` and `baseline` are float64 [T, M] in `metrics` order (NaN = missed scrape or a
    sample row that is absent); `row_missing` is bool [2, T, M] (group 0 = baseline,
    1 = canary): True where no sample row is written at all (False + NaN = a NaN row).
    `timestamps_s` is int64 [T] epoch seconds. `fault_onset_s`/`impact_at_s` are set for faulty
    deployments only (impact None when the canary never breaches in the window);
    `breach_at_s` is the canary's first SLO breach for any family (a shared event can make a
    healthy canary breach). `glitches` counts injected single-point glitches. `onset_style` is
    how a fault begins (`from_start_step`, `from_start_ramp`, `mid_run`; None when healthy).
    """

    deployment_id: str
    service: str
    family: str
    label: str
    timestamps_s: np.ndarray
    metrics: tuple[str, ...]
    canary: np.ndarray
    baseline: np.ndarray
    row_missing: np.ndarray
    fault_onset_s: int | None
    impact_at_s: int | None
    breach_at_s: int | None
    glitches: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    onset_style: str | None = None

    @property
    def fault_kind(self) -> str | None:
        return self.family if self.label == "faulty" else None

    def group(self, name: str) -> np.ndarray:
        return {"baseline": self.baseline, "canary": self.canary}[name]


# --------------------------------------------------------------------------- helpers


def _t(rng: np.random.Generator, size: Any, df: float) -> np.ndarray:
    """Unit-variance Student-t noise, clipped at ±6 so one draw cannot be absurd."""
    return np.clip(rng.standard_t(df, size) * math.sqrt((df - 2) / df), -6.0, 6.0)


def _ar1(rng: np.random.Generator, shape: tuple[int, int], phi: float, sigma: float
         ) -> np.ndarray:
    """Stationary AR(1) rows with marginal std `sigma` along the last axis."""
    e = rng.standard_normal(shape)
    out = lfilter([sigma * math.sqrt(1 - phi * phi)], [1.0, -phi], e[:, 1:], axis=-1,
                  zi=(phi * sigma * e[:, :1]))[0]
    return np.concatenate([sigma * e[:, :1], out], axis=-1)


def _ema(x: np.ndarray, alpha: float) -> np.ndarray:
    """Exponential moving average along the last axis, started at the first value."""
    y, _ = lfilter([alpha], [1.0, alpha - 1.0], x, axis=-1, zi=(1 - alpha) * x[..., :1])
    return np.asarray(y)


def _trapezoid(T: int, t0: int, rise: int, hold: int, fall: int) -> np.ndarray:
    """0 → 1 over `rise` steps from t0, 1 for `hold` steps, 1 → 0 over `fall` steps."""
    t = np.arange(T, dtype=float)
    up = np.clip((t - t0) / max(rise, 1), 0, 1)
    down = np.clip(1 - (t - t0 - rise - hold) / max(fall, 1), 0, 1)
    return np.minimum(up, down)


def _queue_factor(rho: np.ndarray | float) -> np.ndarray:
    """1 / (1 − rho), linearised past the knee so overload keeps growing without dividing by 0."""
    r = np.minimum(np.asarray(rho, dtype=float), _RHO_MAX)
    return 1.0 / (1.0 - np.minimum(r, _RHO_KNEE)) * (1.0 + 20.0 * np.maximum(r - _RHO_KNEE, 0.0))


def _rho_for_factor(factor: float) -> float:
    """Inverse of `_queue_factor` (monotone)."""
    if factor <= 1.0 / (1.0 - _RHO_KNEE):
        return 1.0 - 1.0 / max(factor, 1.0)
    return _RHO_KNEE + (factor * (1.0 - _RHO_KNEE) - 1.0) / 20.0


def _loguniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def slo_thresholds(catalog: Catalog) -> dict[str, float]:
    """SLO per simulated metric the faults aim at: the catalog's, else the built-in default."""
    out = dict(_DEFAULT_SLO)
    for name in out:
        spec = catalog.get(name)
        if spec.slo is not None:
            out[name] = float(spec.slo)
    return out


def first_breach(values: np.ndarray, metrics: tuple[str, ...] | list[str], catalog: Catalog,
                 run: int = BREACH_RUN) -> int | None:
    """First step index where any SLO metric breaches and keeps breaching for `run` steps.

    `values` is [T, M] in `metrics` order. NaN never breaches (and breaks a run). Returns None
    when no SLO metric breaches for `run` consecutive steps.
    """
    first: int | None = None
    T = values.shape[0]
    for spec in catalog.slo_metrics():
        if spec.name not in metrics or spec.slo is None or run > T:
            continue
        v = values[:, list(metrics).index(spec.name)]
        with np.errstate(invalid="ignore"):
            bad = v < spec.slo if spec.direction is Direction.DOWN else v > spec.slo
        held = bad[: T - run + 1].copy()
        for k in range(1, run):
            held &= bad[k: T - run + 1 + k]
        hits = np.flatnonzero(held)
        if len(hits) and (first is None or hits[0] < first):
            first = int(hits[0])
    return first


# --------------------------------------------------------------------------- generator

_G1, _G2 = (math.sqrt(5.0) - 1.0) / 2.0, math.sqrt(2.0) - 1.0


def plan_onset_style(seed: int, index: int, params: SimParams) -> str:
    """The onset style a fault at deployment `index` of corpus `seed` gets.

    Two Weyl sequences (golden ratio, √2) over the index, offset per seed, so the share of
    from-start faults in any stretch of a corpus stays close to `params.from_start_share` (and
    of steps among them to `from_start_step_share`), yet it depends only on (seed, index): the
    same index run as another fault family gets the same style.
    """
    u1, u2 = np.random.default_rng([seed, 2**32 - 2]).random(2)
    if math.fmod(u1 + index * _G1, 1.0) >= params.from_start_share:
        return "mid_run"
    if math.fmod(u2 + index * _G2, 1.0) < params.from_start_step_share:
        return "from_start_step"
    return "from_start_ramp"


def generate(family: str, seed: int, index: int, params: SimParams, catalog: Catalog,
             deployment_id: str | None = None, start_s: int | None = None,
             onset_style: str | None = None) -> SimulatedDeployment:
    """Generate deployment `index` of corpus `seed` as family `family`.

    Randomness comes from `SeedSequence([seed, index])` split into independent streams for
    the service profile, the per-step noise, the family's own draws and the scrape defects, so
    the same (seed, index) run as two families shares its service and noise (paired data).
    `start_s` defaults to the corpus schedule: params.start + index × spacing + jitter.
    `onset_style` forces a fault's onset style (one of ONSET_STYLES); by default it is
    `plan_onset_style(seed, index, params)`. Forcing it changes no other draw: the deployment
    is the planned one with another onset.
    """
    if family not in FAMILIES:
        raise ConfigError(f"unknown simulator family {family!r}; known: {', '.join(FAMILIES)}")
    label = label_of(family)
    if onset_style is not None and onset_style not in ONSET_STYLES:
        raise ConfigError(f"onset_style={onset_style!r} is not one of {', '.join(ONSET_STYLES)}")
    if onset_style is not None and label != "faulty":
        raise ConfigError(f"onset_style={onset_style!r} applies to fault families only, not the "
                          f"healthy variant {family!r}; leave it unset")
    prof, noise_rng, fam, scrape = (np.random.default_rng(s)
                                    for s in np.random.SeedSequence([seed, index]).spawn(4))
    p = params
    T, step = p.steps, float(p.step_s)
    nz, df = p.noise, p.tail_df
    slo = slo_thresholds(catalog)

    # ---- service profile (same draws for every family)
    service = p.services[int(prof.integers(len(p.services)))]
    jitter_steps = int(prof.integers(0, max(1, (p.spacing_s - p.duration_s) // p.step_s + 1)))
    if start_s is None:
        start_s = p.start_s + index * p.spacing_s + jitter_steps * p.step_s
    rps0 = _loguniform(prof, 20.0, 250.0)  # requests/s per pod at the diurnal mean
    util0 = prof.uniform(0.2, 0.45)  # mean CPU utilisation of the pod limit
    amp = prof.uniform(0.1, 0.3)  # diurnal amplitude
    peak_hour = prof.uniform(12.0, 20.0)
    cpu_limit = float(prof.choice([1.0, 2.0, 4.0]))
    cap = 0.9 * cpu_limit
    cpu_idle = prof.uniform(0.01, 0.05) * cpu_limit
    cpu_per_req = max(util0 * cap - cpu_idle, 0.05 * cap) / rps0
    p99_0 = prof.uniform(0.12, 0.4)  # nominal p99 latency, s
    queue_share = prof.uniform(0.3, 0.7)
    s_svc = queue_share * p99_0 * (1 - util0) / _QLOG[2]
    d99 = (1 - queue_share) * p99_0
    d95 = d99 * prof.uniform(0.55, 0.75)
    d50 = d95 * prof.uniform(0.3, 0.5)
    d_q = np.array([d50, d95, d99])
    err0 = _loguniform(prof, 0.0005, 0.008)
    mem_base = prof.uniform(0.35e9, 1.0e9)
    gc_amp = mem_base * prof.uniform(0.1, 0.3)
    gc_period_s = prof.uniform(120.0, 480.0)
    gc_phase = prof.uniform(0.0, 1.0, size=2)
    node_cores = float(prof.choice([4.0, 8.0, 16.0]))
    node_mem = float(prof.choice([16.0, 32.0, 64.0])) * 2**30
    other_cpu = prof.uniform(0.08, 0.3, size=(2, 1))
    other_mem = prof.uniform(0.25, 0.5, size=(2, 1))
    req_bytes = prof.uniform(500.0, 4000.0)
    resp_bytes = _loguniform(prof, 2e3, 6e4)
    disk_base = _loguniform(prof, 5e4, 2e6)
    io_per_req = prof.uniform(0.0, 2e4)
    st0 = _loguniform(prof, 5e-4, 8e-3)
    pods = np.array([prof.integers(p.baseline_pods[0], p.baseline_pods[1] + 1),
                     prof.integers(p.canary_pods[0], p.canary_pods[1] + 1)], dtype=float)
    imbalance = np.array([1.0, prof.uniform(0.92, 1.08)])[:, None]
    load_factor = prof.uniform(0.8, 1.1)

    # per-group copies that a family may change (row 1 = canary)
    cpu_per_req_g = np.full((2, 1), cpu_per_req)
    cpu_idle_g = np.full((2, 1), cpu_idle)
    mem_base_g = np.full((2, 1), mem_base)

    # ---- traffic (shared phase and mix, per-group noise)
    t = np.arange(T)
    ts = start_s + t * p.step_s
    hours = (ts % 86400) / 3600.0
    diurnal = 1.0 + amp * np.cos(2 * np.pi * (hours - peak_hour) / 24.0)
    mix = np.exp(_ar1(noise_rng, (1, T), 0.95, 0.05 * nz))
    lam = rps0 * diurnal * mix * imbalance * np.exp(0.03 * nz * _t(noise_rng, (2, T), df))

    # ---- family draws
    details: dict[str, Any] = {}
    onset: int | None = None
    style: str | None = None
    prog = np.zeros(T)
    g = np.zeros(T)
    if label == "faulty":
        lo, hi = p.onset_window
        mid_onset = int(fam.integers(int(lo * T), max(int(lo * T) + 1, int(hi * T))))
        breach_after = _loguniform(fam, *p.breach_after_s)
        shape = fam.uniform(1.0, 2.0)
        # drawn for every fault, whatever its style, so that the style changes nothing else
        level = fam.uniform(*p.step_level)
        drift = fam.uniform(*p.step_drift_per_h)
        style = onset_style or plan_onset_style(seed, index, p)
        onset = mid_onset if style == "mid_run" else 0
        if style == "from_start_step":  # prog = level at the first sample, then a slow drift
            g0, rate = level ** (1.0 / shape), drift / 3600.0
            details.update(step_level=round(level, 3), drift_per_h=round(drift, 3))
        else:  # a ramp from zero at the onset
            g0, rate = 0.0, 1.0 / breach_after
            details.update(breach_after_s=round(breach_after, 1))
        g = np.clip(g0 + (t - onset) * step * rate, 0.0, _PROG_MAX)
        prog = np.minimum(g**shape, _PROG_MAX)
        details.update(onset_style=style, shape=round(shape, 3))
    surge = np.ones(T)
    downstream = np.zeros(T)
    if family == "benign_shift":
        f_cpu = fam.uniform(*p.benign_cpu_factor)
        f_mem = fam.uniform(*p.benign_memory_factor)
        cpu_per_req_g[1] *= f_cpu
        cpu_idle_g[1] *= f_cpu
        mem_base_g[1] *= f_mem
        details.update(cpu_factor=round(f_cpu, 3), memory_factor=round(f_mem, 3))
    elif family == "traffic_surge":
        factor = fam.uniform(*p.surge_factor)
        t0 = int(fam.integers(T // 4, max(T // 4 + 1, int(0.6 * T))))
        surge = 1.0 + (factor - 1.0) * _trapezoid(T, t0, int(fam.integers(4, 17)),
                                                  int(fam.integers(20, 81)),
                                                  int(fam.integers(8, 25)))
        # the HPA scales both groups out after a lag, towards 60 % utilisation
        lag = int(fam.integers(3, 7))
        desired = np.maximum(1.0, surge * util0 * (1 + amp) / 0.6)
        delayed = np.concatenate([np.ones(lag), desired[:-lag]])
        scale = _ema(delayed, 0.35)
        lam = lam * surge / scale
        details.update(surge_factor=round(factor, 3), surge_at=int(t0))

    # ---- CPU and utilisation
    hot = np.zeros((2, T))
    cpu_work = lam * cpu_per_req_g
    if family == "cpu_hot_loop":
        # the hot loop's size at prog = 1 is the one that drives p99 to the SLO
        target = (slo["latency_p99"] - d99) / (s_svc * _QLOG[2])
        rho_star = _rho_for_factor(target)
        rho_now = float(np.median((cpu_idle_g[1] + cpu_work[1]) / cap))
        hot_at_breach = max(rho_star - rho_now, 0.05) * cap * 1.05
        # spinning threads switch on in steps of a fraction of a core
        quantum = fam.uniform(0.1, 0.3) * hot_at_breach
        hot[1] = np.floor(prog * hot_at_breach / quantum) * quantum + prog * 0.1 * quantum
        details.update(hot_cores_at_breach=round(hot_at_breach, 3))
    if family == "conn_pool_exhaustion":
        cpu_work[1] *= 1.0 - 0.12 * np.clip(g, 0, 1)  # threads block on the pool instead
    demand = cpu_idle_g + cpu_work + hot
    rho = demand / cap
    app_cpu = np.minimum(demand, cpu_limit) * np.exp(0.03 * nz * _t(noise_rng, (2, T), df))

    # ---- latency
    base_q = d_q[:, None, None] + s_svc * np.array(_QLOG)[:, None, None] * _queue_factor(rho)
    headroom99 = max(slo["latency_p99"] - float(np.median(base_q[2, 1])), 0.05)
    extra = np.zeros((3, 2, T))  # quantile × group × time
    err_extra = np.zeros((2, T))
    storage_extra = np.zeros((2, T))
    io_factor = np.ones((2, T))
    dstate = np.zeros((2, T))
    if family == "latency_creep":
        extra[:, 1] = np.array([0.35, 0.7, 1.05])[:, None] * prog * headroom99
        err_extra[1] = np.clip(0.05 * (prog - 1.5), 0, 0.2)  # client timeouts, late
    elif family == "error_ramp":
        err_extra[1] = np.minimum(prog * (slo["error_rate"] - err0) * 1.1, 0.6)
        extra[0, 1] = -0.1 * np.minimum(prog, 1.0) * d50  # failed requests return fast
    elif family == "conn_pool_exhaustion":
        sharp = np.minimum(g ** (float(details["shape"]) + 1.0), _PROG_MAX)
        extra[:, 1] = np.array([0.02, 0.85, 1.05])[:, None] * sharp * headroom99
        err_extra[1] = np.clip(0.2 * (g - 1.2), 0, 0.4)  # pool acquire timeouts, later
    elif family == "slow_storage":
        calls = fam.uniform(2.0, 6.0)  # storage calls per request on the tail path
        storage_extra[1] = prog * headroom99 * 1.05 / calls
        app_prog = np.minimum(g ** (float(details["shape"]) + 0.7), _PROG_MAX)  # requests feel it after storage does
        extra[:, 1] = np.array([0.2, 0.6, 1.05])[:, None] * app_prog * headroom99
        io_factor[1] = 1.0 + 0.6 * np.clip(g, 0, 1.5)
        dstate[1] = 0.25 * node_cores * np.clip(prog, 0, 2)
        details.update(storage_calls=round(calls, 2))
    elif family == "shared_downstream_slowdown":
        headroom_both = max(slo["latency_p99"] - float(np.median(base_q[2].max(axis=0))), 0.05)
        share = fam.uniform(*p.slowdown_headroom_share)
        t0 = int(fam.integers(T // 4, max(T // 4 + 1, int(0.6 * T))))
        downstream = share * headroom_both * _trapezoid(T, t0, int(fam.integers(4, 13)),
                                                        int(fam.integers(20, 81)),
                                                        int(fam.integers(4, 17)))
        extra += np.array([0.4, 0.7, 1.0])[:, None, None] * downstream[None, None, :]
        err_extra += 0.002 * downstream / max(downstream.max(), 1e-9)
        details.update(headroom_share=round(share, 3), slowdown_at=int(t0))

    # ---- memory (GC sawtooth, leak with OOM restarts)
    alloc = gc_amp / gc_period_s * lam / rps0 * step  # bytes allocated per step
    heap = np.cumsum(alloc, axis=1) + gc_phase[:, None] * gc_amp
    saw = gc_amp * np.mod(heap / gc_amp, 1.0)
    mem_pre = mem_base_g * (1.0 + 0.05 * lam / rps0) + saw
    limit = max(p.memory_limit_bytes, slo["app_memory"] * 1.03)
    restarts: list[int] = []
    leak = np.zeros(T)
    if family == "mem_leak":
        o = onset or 0
        # the heap's peak without the fault: before onset, or over the window from the start
        peak0 = float(np.max(mem_pre[1, :o] if o > 0 else mem_pre[1]))
        leak_raw = prog * max(slo["app_memory"] - peak0, 0.02 * slo["app_memory"]) * 1.05
        cap = 0.98 * (limit - peak0)
        if leak_raw[o] > cap:  # a step never starts past the OOM limit (no crash loop)
            leak_raw[o:] += cap - leak_raw[o]
        leak = leak_raw.copy()
        while True:  # each OOM kill restarts the pod: the leak starts over from a fresh heap
            over = np.flatnonzero(mem_pre[1] + leak > limit)
            if not len(over) or (restarts and int(over[0]) <= restarts[-1]):
                break
            i = int(over[0])
            restarts.append(i)
            leak[i:] = leak_raw[o: o + T - i]
        details.update(oom_restarts=len(restarts))
    memory = mem_pre.copy()
    memory[1] += leak
    if family == "mem_leak":
        heap_frac = memory[1] / limit
        gc_pressure = np.clip((heap_frac - 0.85) / 0.15, 0, 1) ** 2
        extra[:, 1] += np.array([0.2, 0.5, 0.9])[:, None] * gc_pressure * headroom99
        err_extra[1] += 0.03 * np.clip((heap_frac - 0.9) / 0.1, 0, 1) ** 2
        for i in restarts:  # a restart drops in-flight requests and serves cold for a while
            err_extra[1, i: i + 2] += fam.uniform(0.2, 0.5)
            extra[:, 1, i: i + 3] += 0.5 * headroom99
    memory *= np.exp(0.004 * nz * _t(noise_rng, (2, T), df))

    # ---- latency observation: histogram quantiles are noisy, heavier in the tail
    lat = base_q + extra
    lat_sigma = np.array([0.03, 0.06, 0.09])[:, None, None] * nz
    wander = _ar1(noise_rng, (2, T), 0.9, 0.04 * nz)[None]
    lat = np.maximum(lat, 1e-4) * np.exp(lat_sigma * _t(noise_rng, (3, 2, T), df) + wander)
    lat = np.minimum(lat, _LAT_TOP_S)
    lat[1] = np.maximum(lat[1], lat[0])
    lat[2] = np.maximum(lat[2], lat[1])

    # ---- requests and errors
    restart_drop = np.ones((2, T))
    for i in restarts:
        restart_drop[1, i: i + 2] = 0.5
    requests = noise_rng.poisson(lam * restart_drop * pods[:, None] * step)
    sat_err = np.clip(0.5 * (rho - 0.95), 0, 0.5)
    p_err = np.clip(err0 * np.exp(0.2 * nz * _ar1(noise_rng, (2, T), 0.8, 1.0)) + err_extra
                    + sat_err, 0.0, 1.0)
    errors = noise_rng.binomial(requests, p_err)
    n_req = np.maximum(requests, 1)
    request_rate = requests / (pods[:, None] * step)
    error_rate = errors / n_req

    # ---- node and network
    other = other_cpu * np.exp(_ar1(noise_rng, (2, T), 0.95, 0.08 * nz))
    node_cpu = np.clip(other + app_cpu / node_cores
                       + 0.01 * nz * _t(noise_rng, (2, T), df), 0.0, 1.0)
    node_memory = np.clip(other_mem * np.exp(_ar1(noise_rng, (2, T), 0.98, 0.01 * nz))
                          + memory / node_mem, 0.0, 1.0)
    runq = node_cores * 3.0 * np.maximum(rho - 1.0, 0.0)
    load1 = _ema(node_cpu * node_cores * load_factor + runq + dstate, 1 - math.exp(-step / 60))
    load1 = np.maximum(load1 * np.exp(0.05 * nz * _t(noise_rng, (2, T), df)), 0.0)
    net_rx = request_rate * req_bytes * np.exp(0.04 * nz * _t(noise_rng, (2, T), df)) + 2e3
    net_tx = (request_rate * resp_bytes * (1.0 - 0.8 * error_rate)
              * np.exp(0.04 * nz * _t(noise_rng, (2, T), df)) + 2e3)
    disk_io = ((disk_base + request_rate * io_per_req) * io_factor
               * np.exp(0.12 * nz * _t(noise_rng, (2, T), df)))
    disk_util = np.clip(disk_io / 5e7, 0, 1)
    storage_latency = (st0 * (1.0 + 0.5 * disk_util) + storage_extra) * np.exp(
        0.15 * nz * _t(noise_rng, (2, T), df))

    values = np.stack([request_rate, error_rate, lat[0], lat[1], lat[2], app_cpu, memory,
                       node_cpu, node_memory, net_rx, net_tx, disk_io, storage_latency, load1],
                      axis=-1).astype(np.float64)  # [2, T, M]

    # ---- scrape defects: missed scrapes per target, single-point glitches per series
    glitches = _glitch(scrape, values, p.glitch_rate)
    missed = np.zeros_like(values, dtype=bool)
    for cols in (slice(0, len(APP_TARGET)), slice(len(APP_TARGET), len(SIM_METRICS))):
        miss = scrape.random((2, T)) < p.scrape_miss_rate
        missed[:, :, cols] = miss[:, :, None]
    row_missing = missed & (scrape.random((2, T, 1)) < p.missing_rows_share)
    values[missed] = np.nan

    # ---- select the catalog's metrics and compute labels from the canary series
    metrics = tuple(m for m in catalog.names if m in _M) or SIM_METRICS
    cols_idx = [_M[m] for m in metrics]
    canary = values[1][:, cols_idx]
    baseline = values[0][:, cols_idx]
    breach = first_breach(canary, metrics, catalog)
    breach_at = None if breach is None else int(ts[breach])
    onset_s = None if onset is None else int(ts[onset])
    did = deployment_id or f"sim-{seed}-{index:05d}"
    details.update(pods=pods.astype(int).tolist(), restarts=restarts)
    return SimulatedDeployment(
        deployment_id=did, service=service, family=family, label=label,
        timestamps_s=ts.astype(np.int64), metrics=metrics, canary=canary, baseline=baseline,
        row_missing=row_missing[:, :, cols_idx], fault_onset_s=onset_s,
        impact_at_s=breach_at if label == "faulty" else None, breach_at_s=breach_at,
        glitches=glitches, details=details, onset_style=style)


def _glitch(rng: np.random.Generator, values: np.ndarray, rate: float) -> int:
    """Single-point glitches in place: a spike (×2.5–6) or a drop (×0–0.3), never two adjacent
    in one series. Ratios stay within [0, 1]. Returns how many were injected."""
    if rate <= 0:
        return 0
    hit = rng.random(values.shape) < rate  # [2, T, M]
    hit[:, 1:, :] &= ~hit[:, :-1, :]  # keep them single points
    n = int(hit.sum())
    if not n:
        return 0
    up = rng.random(n) < 0.5
    factor = np.where(up, rng.uniform(2.5, 6.0, n), rng.uniform(0.0, 0.3, n))
    values[hit] = values[hit] * factor
    for name in ("error_rate", "node_cpu", "node_memory"):
        col = values[:, :, _M[name]]
        np.clip(col, 0.0, 1.0, out=col)
    for name in ("latency_p50", "latency_p95", "latency_p99"):
        col = values[:, :, _M[name]]
        np.clip(col, 0.0, _LAT_TOP_S, out=col)
    er = values[:, :, _M["error_rate"]]
    spike = hit[:, :, _M["error_rate"]]
    er[spike] = np.maximum(er[spike], rng.uniform(0.0, 0.15, int(spike.sum())))
    return n
