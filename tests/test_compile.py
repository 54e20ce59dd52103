"""torch.compile of the streaming forward (WanDiT.compile_streaming) on CPU with the tiny model.

The window forward and the clean re-run trace as one graph each (no graph breaks), compile once per
batch size / dtype in the steady state (static shapes: no recompiles), and match eager.  Inductor on CPU
takes a few seconds per graph: the compiled streams are module-scoped fixtures shared by the tests.
"""
import pytest
import torch

from avatarforcing import AvatarForcingError
from avatarforcing.sampler import StreamingSampler
from avatarforcing.stream_state import NoiseSource
from avatarforcing.schedule import WindowSchedule
from helpers import cache_cfg, random_tiny_model, schedule_cfg

H = W = 4
BLOCKS = 10            # L = 4: steps 0-3 warm up (step 3 emits first), 4-9 are steady (6 steps), 10-12 drain
L = 4


def make_sampler(model, batch=1, blocks=BLOCKS, dtype=torch.float32, **cache):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(batch, 16, 1, H, W, generator=g).to(dtype)
    text = torch.randn(batch, 8, model.cfg.text_dim, generator=g).to(dtype)
    audio = torch.randn(batch, 1 + blocks * 4, model.cfg.audio_dim, generator=g).to(dtype)
    sch = WindowSchedule.from_config(schedule_cfg())
    return StreamingSampler(model, sch, cache_cfg(**cache), ref, text, audio=lambda a, b: audio[:, a:b],
                            noise=NoiseSource(5, dtype=dtype), num_blocks=blocks)


@torch.no_grad()
def stream(model, on_step=None, **kw):
    """Emitted x0 of every block, concatenated over time; ``on_step(i)`` after streaming step i."""
    smp = make_sampler(model, **kw)
    out, i = [], 0
    while (res := smp.step()) is not None:
        if res["emitted"] is not None:
            out.append(res["emitted"][1])
        if on_step:
            on_step(i)
        i += 1
    return torch.cat(out, 2)


class CountingBackend:
    """A torch.compile backend that records every graph it gets and runs it as traced (eager kernels)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def core_calls(model):
    """Count the calls that reach the compiled function."""
    calls, fn = [0], model._compiled.fn

    def counted(*a, **k):
        calls[0] += 1
        return fn(*a, **k)
    model._compiled.fn = counted
    return calls


# ---- no graph breaks -------------------------------------------------------------------------------


def test_window_forward_and_clean_rerun_have_no_graph_breaks():
    model = random_tiny_model(1)
    smp = make_sampler(model)
    captured, core = {}, model.forward_core

    def spy(*a, **k):
        captured["rerun" if smp.cache.rerun else "window"] = (a, k)
        return core(*a, **k)
    model.forward_core = spy
    with torch.no_grad():
        for _ in range(L + 1):                  # through the first steady step
            smp.step()
    del model.forward_core
    for name in ("window", "rerun"):
        a, k = captured[name]
        with torch.no_grad():
            ex = torch._dynamo.explain(model.forward_core)(*a, **k)
        assert ex.graph_break_count == 0, (name, [r.reason for r in ex.break_reasons])
        assert ex.graph_count == 1, name


# ---- static shapes: one graph per layout, no recompiles in the steady state -------------------------


def test_steady_state_compiles_two_graphs_and_never_recompiles():
    model = random_tiny_model(1)
    backend = CountingBackend()
    model.compile_streaming(backend=backend)
    calls = core_calls(model)
    graphs, ncalls = [], []

    def on_step(i):
        graphs.append(len(backend.graphs))
        ncalls.append(calls[0])
    want = stream(random_tiny_model(1))
    got = stream(model, on_step=on_step)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert graphs[:L] == [0] * L                      # warm-up (growing window / context): eager
    assert graphs[L:] == [2] * (len(graphs) - L)      # window + clean re-run at step L, nothing after
    steady = range(L, BLOCKS)
    assert [ncalls[i] - ncalls[i - 1] for i in steady] == [2] * len(steady)   # every steady step compiled
    drain = range(BLOCKS, len(ncalls))                # shrinking window: eager; its re-runs are steady
    assert [ncalls[i] - ncalls[i - 1] for i in drain] == [1] * len(drain)
    # batch > 1: one more graph per layout, again static
    stream(model, batch=3)
    assert len(backend.graphs) == 4
    stream(model, batch=3)
    stream(model)
    assert len(backend.graphs) == 4


def test_compile_mode_is_checked():
    with pytest.raises(AvatarForcingError, match="compile_mode"):
        random_tiny_model(1).compile_streaming("fastest")


# ---- inductor: compiled == eager --------------------------------------------------------------------


@pytest.fixture(scope="module")
def inductor_fp32():
    """Eager and inductor-compiled streams of the tiny model in fp32, batch 2."""
    model = random_tiny_model(1)
    eager = stream(model, batch=2)
    model.compile_streaming("default")
    compiled = stream(model, batch=2)
    return model, eager, compiled


def test_inductor_equals_eager_fp32(inductor_fp32):
    model, eager, compiled = inductor_fp32
    assert len(model.compile_report()) == 2           # the window forward and the clean re-run
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_inductor_equals_eager_bf16():
    """bf16: inductor fuses the fp32 norm / modulation / RoPE math without the eager roundings to bf16
    between ops, so the streams differ by bf16 rounding (< 1.5e-2 of the largest value), not more."""
    model = random_tiny_model(1).to(torch.bfloat16)
    eager = stream(model, dtype=torch.bfloat16).float()
    model.compile_streaming("default")
    compiled = stream(model, dtype=torch.bfloat16).float()
    assert len(model.compile_report()) == 2
    err = (compiled - eager).abs().max() / eager.abs().max()
    assert err < 1.5e-2, float(err)                  # measured 4e-3 (max abs 1.6e-2, one bf16 ulp at |x| ~ 2-4)
    torch.testing.assert_close(compiled, eager, atol=3e-2, rtol=2e-2)


def test_compile_keeps_eager_paths_uncompiled(inductor_fp32):
    """Forwards without a cache (teacher, anchor prefill, masks) never reach the compiled function."""
    model = inductor_fp32[0]
    calls = core_calls(model)
    x = torch.randn(1, 16, 2, H, W)
    with torch.no_grad():
        out = model.clip(x, x[:, :, :1], torch.tensor([[500.0, 500.0]]), None, torch.randn(1, 8, model.cfg.text_dim))
    assert out.shape == (1, 16, 2, H, W) and calls[0] == 0


def test_pipeline_config_enables_compile(repo_root):
    from avatarforcing.config import load_config
    from avatarforcing.pipeline import AvatarPipeline
    path = repo_root / "configs" / "tiny.yaml"
    assert AvatarPipeline.from_config(load_config(path, [])).model._compiled is None       # default: eager
    pipe = AvatarPipeline.from_config(load_config(path, ["inference.compile=true",
                                                         "inference.compile_mode=reduce-overhead"]))
    assert pipe.model._compiled is not None and pipe.model._compiled.clone
    assert pipe.model.compile_report() == []                                               # lazy
    with pytest.raises(AvatarForcingError, match="compile_mode"):
        AvatarPipeline.from_config(load_config(path, ["inference.compile=true", "inference.compile_mode=fast"]))
