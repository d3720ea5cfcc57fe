"""Where the decoder runs: device choice, CPU threads, determinism and graph capture.

Training and generation both ask here, so a run says once what it runs on and under which numerics::

    device = resolve_device("auto")                # cuda:0 when torch sees a GPU, else cpu
    with execution(device, deterministic=True, threads=None, seed=42):
        ...                                        # bit-identical reruns on the same machine

On a shared CPU the threads default to the cores this process may use (affinity and cgroup quota), not
``os.cpu_count()``; how idle OpenMP threads wait is settled before torch loads (`cores.settle_openmp`):
spinning threads beside busy processes made the engine 3x slower than a single thread.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from evaluator.cores import usable_cpus
from evaluator.errors import ConfigError, EnvironmentUnavailable, first_line

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS workspace setting that makes its GEMMs reproducible
COMPILE_MODES = ("auto", "on", "off")


def resolve_device(spec: str | None = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch device that exists here.

    Raises:
        ConfigError: the name is not one of those.
        EnvironmentUnavailable: CUDA was asked for and torch sees no (such) GPU.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"--device {spec!r} is not one of {', '.join(DEVICE_CHOICES)}") from e
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(f"--device {spec!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        why = ("this torch was built without CUDA" if torch.version.cuda is None
               else "no GPU is visible (driver, CUDA_VISIBLE_DEVICES or container flags)")
        raise EnvironmentUnavailable(f"--device {spec}: torch {torch.__version__} cannot use CUDA here: {why}; "
                                     "use --device cpu or auto")
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise EnvironmentUnavailable(f"--device {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """'cpu (2 usable cores)' or 'cuda:0 (NVIDIA H200)', for logs and results.json."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({usable_cpus()} usable cores)"


def cpu_threads(threads: int | None = None) -> int:
    """Torch threads for CPU work: ``threads`` when given, else every core this process may use.

    fp32 sums round differently with another thread count, so a fixed machine (or ``--threads``) gives
    bit-identical reruns; how idle threads wait (cores.settle_openmp) decides how they share a busy one.
    """
    return threads or usable_cpus()


@contextlib.contextmanager
def execution(device: torch.device, *, deterministic: bool, threads: int | None, seed: int | None = None,
              tf32: bool | None = None):
    """Threads, determinism and the seed for one training or generation; previous settings come back after.

    deterministic=True: deterministic algorithms, and on CUDA the reproducible cuBLAS workspace with TF32
    off, so a rerun on the same machine gives the same bits. False: the fast defaults (bf16 mode).
    ``tf32`` (CUDA matmuls in TensorFloat-32) defaults to ``not deterministic``; fp32 decoding keeps it off.
    """
    tf32 = (not deterministic) if tf32 is None else tf32
    saved = {
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(threads))
    if deterministic and device.type == "cuda":
        # read when cuBLAS makes its first handle: set before the first GEMM of the process
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(deterministic)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = False
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)  # seeds every device's generator
            yield
    finally:
        torch.set_num_threads(saved["threads"])
        torch.use_deterministic_algorithms(saved["deterministic"])
        torch.backends.cuda.matmul.allow_tf32 = saved["matmul_tf32"]
        torch.backends.cudnn.allow_tf32 = saved["cudnn_tf32"]
        torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]


def use_compile(mode: str, device: torch.device) -> bool:
    """Whether to capture the decoder as graphs: ``auto`` means on CUDA only (on a CPU it only adds compile time)."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {COMPILE_MODES} (got {mode!r})")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compiled(fn, *, device: torch.device, exact: bool, backend: str | None = None, dynamic: bool | None = None):
    """``fn`` under torch.compile, captured as CUDA graphs on a GPU.

    exact=True keeps eager kernels (the ``cudagraphs`` backend: same numerics as eager, only the launches
    are replayed); exact=False lets inductor fuse kernels too. ``dynamic=None`` traces once more with
    symbolic lengths after the second shape, then records one graph per length bucket without tracing
    again. ``backend`` overrides the choice (tests use ``aot_eager`` on the CPU to prove the graph traces
    without a break, the condition for capturing it on a GPU).
    """
    if backend is None:
        if device.type == "cuda":
            backend = "cudagraphs" if exact else "inductor"
        else:
            backend = "aot_eager" if exact else "inductor"
    options = {"mode": "reduce-overhead"} if backend == "inductor" and device.type == "cuda" else {}
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic, **options)


@contextlib.contextmanager
def graph_cache(graphs: int = 64):
    """Room for one captured graph per length bucket (dynamo keeps 8 per function, then silently runs eager)."""
    import torch._dynamo

    with torch._dynamo.config.patch(cache_size_limit=graphs):
        yield


class Fallback:
    """Call the compiled function; on its first failure log once and run the eager one from then on.

    Graph capture is an optimisation with the same mathematics: when a torch or driver version cannot
    capture this model, the run goes on in eager mode instead of failing after hours of extraction.
    """

    def __init__(self, fast, eager, what: str):
        self.fast, self.eager, self.what = fast, eager, what
        self.failed: str | None = None

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            try:
                return self.fast(*args, **kwargs)
            except Exception as e:  # any compiler/capture failure: the eager path computes the same thing
                self.disable(e)
        return self.eager(*args, **kwargs)

    def disable(self, error: BaseException) -> None:
        """Use the eager function from now on (also called when the captured backward fails)."""
        self.failed = f"{type(error).__name__}: {first_line(error)}"
        logger.warning("%s: graph capture failed (%s); continuing in eager mode", self.what, self.failed)
