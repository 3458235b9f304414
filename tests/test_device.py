"""The engine on every device here: CPU always, CUDA when available (``make gpu-check`` runs this
file on a GPU machine; ``DECODEBENCH_TEST_DEVICE=cuda`` insists on CUDA and fails without it).

Per device and dtype: the Backbone's logits equal the HF model's own forward (prefill, a cached
chain step, a small tree), masks and caches live on the device, PLD decodes exactly what AR decodes;
and every time reading synchronises the device (checked with a fake CUDA synchronise on a CPU).
"""

import json
import os
import time

import pytest
import torch

from decodebench.config import MethodConfig, ModelConfig
from decodebench.engine import memory, timing
from decodebench.engine.backbone import Backbone, BlockLayout
from decodebench.engine.decode_loop import DecodeSettings, generate
from decodebench.methods import build_method
from decodebench.models.tiny import build_tiny

from helpers import TINY, repeating_prompts


def devices() -> list[str]:
    wanted = os.environ.get("DECODEBENCH_TEST_DEVICE")
    if wanted:
        return [wanted]
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


# (dtype, max |logit difference| allowed vs the HF forward): fp32 exact up to kernel order; half
# precision within the error of one rounding of the activations
DTYPES = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.05}
CASES = [
    (d, t)
    for d in devices()
    for t in (("float32", "bfloat16", "float16") if d.startswith("cuda") else ("float32", "bfloat16"))
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{d}-{t}" for d, t in CASES])
def placed(request):
    device, dtype = request.param
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail("DECODEBENCH_TEST_DEVICE asks for CUDA, but torch.cuda.is_available() is False")
    config = ModelConfig(
        name="tiny-device", source="tiny", architecture="llama", tiny={**TINY, "max_position_embeddings": 512}
    )
    model = build_tiny(config, seed=0).to(device=device, dtype=getattr(torch, dtype)).eval()
    return Backbone(model), DTYPES[dtype]


def hf_logits(backbone: Backbone, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out = backbone.model(torch.tensor([ids], device=backbone.device))
    return out.logits[0].float()


def test_prefill_cached_step_and_tree_equal_the_hf_forward(placed):
    backbone, tolerance = placed
    prompt = repeating_prompts(1)[0][:20]
    cache = backbone.new_cache(64)
    assert cache.keys[0].device.type == backbone.device.type and cache.keys[0].dtype == backbone.dtype
    prefill = backbone.forward(prompt, cache)
    assert prefill.logits.device.type == backbone.device.type
    assert (prefill.logits - hf_logits(backbone, prompt)).abs().max().item() <= tolerance

    step = backbone.forward([7], cache)  # a cached chain step
    assert (step.logits[0] - hf_logits(backbone, [*prompt, 7])[-1]).abs().max().item() <= tolerance

    # a small tree after the prefix: root 7 with children 8 and 9, and 10 under 8
    cache.crop(len(prompt))
    tree = backbone.forward([7, 8, 9, 10], cache, layout=BlockLayout(parents=[-1, 0, 0, 1]))
    for node, path in {1: [7, 8], 2: [7, 9], 3: [7, 8, 10]}.items():
        reference = hf_logits(backbone, [*prompt, *path])[-1]
        assert (tree.logits[node] - reference).abs().max().item() <= tolerance


def test_masks_are_built_on_the_device(placed):
    backbone, _ = placed
    positions = torch.arange(5, 9, device=backbone.device)
    block = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    mask = backbone._block_mask(5, positions, block, None)
    assert mask.device.type == backbone.device.type and tuple(mask.shape[-2:]) == (4, 9)
    assert bool(mask[..., :5].all()) and torch.equal(mask[0, 0, :, 5:].cpu(), block)
    chain = backbone._block_mask(5, positions, None, None)
    assert torch.equal(chain[0, 0, :, 5:].cpu(), torch.ones(4, 4, dtype=torch.bool).tril())


def test_pld_decodes_what_ar_decodes(placed):
    backbone, _ = placed
    settings = DecodeSettings(max_new_tokens=24)
    for prompt in repeating_prompts(3):
        outputs = []
        for name, impl in (
            ("ar", "decodebench.methods.ar:AutoregressiveDrafter"),
            ("pld", "decodebench.methods.pld:PromptLookupDrafter"),
        ):
            drafter = build_method(MethodConfig(name=name, impl=impl), str(backbone.device))
            drafter.setup(backbone)
            outputs.append(generate(backbone, drafter, prompt, settings, backbone.new_cache(16)))
        ar, pld = outputs
        assert pld.new_ids == ar.new_ids
        assert all(s.forward_s > 0 and s.forward_s <= s.verify_s for s in pld.steps)


# --- synchronised timers and peak memory (fakes: no GPU needed) --------------------------------------
def test_now_synchronises_cuda_before_reading_the_clock(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    monkeypatch.setattr(time, "perf_counter", lambda: events.append(("clock", None)) or 42.0)
    assert timing.now(torch.device("cuda:1")) == 42.0
    assert events == [("sync", "cuda:1"), ("clock", None)]
    events.clear()
    timing.now(torch.device("cpu"))
    assert events == [("clock", None)]  # nothing to wait for on a CPU


def test_every_time_reading_of_the_decode_loop_synchronises(monkeypatch):
    """The loop reads the clock only through ``timing.now`` (which synchronises): 3 readings around the
    prefill and the whole turn, and 5 per step (propose, forward, verify, feedback, done)."""
    readings = []
    real = timing.synchronize
    monkeypatch.setattr(timing, "synchronize", lambda device: readings.append(device) or real(device))
    config = ModelConfig(name="t", source="tiny", architecture="llama", tiny=TINY)
    backbone = Backbone(build_tiny(config, seed=0))
    drafter = build_method(MethodConfig(name="pld", impl="decodebench.methods.pld:PromptLookupDrafter"))
    out = generate(backbone, drafter, repeating_prompts(1)[0], DecodeSettings(max_new_tokens=16), backbone.new_cache(8))
    assert len(readings) == 3 + 5 * len(out.steps) and all(d == backbone.device for d in readings)


def test_peak_memory_reports_cuda_counters(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", str(device))))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 123)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 456)
    memory.reset_peak_memory("cuda:0")
    assert calls == [("reset", "cuda:0")]
    gpu = memory.peak_memory("cuda:0")
    assert (gpu["peak_gpu_allocated_bytes"], gpu["peak_gpu_reserved_bytes"]) == (123, 456) and gpu["peak_rss_bytes"] > 0
    cpu = memory.peak_memory("cpu")
    assert cpu["peak_gpu_allocated_bytes"] is None and cpu["peak_rss_bytes"] > 1_000_000


def test_a_runs_peak_rss_is_its_own_not_the_sweep_processes(monkeypatch, tmp_path):
    """A sweep's cells share one process: after the reset a cell's peak RSS forgets an earlier cell's
    larger one (Linux high-water mark); where it cannot be reset the lifetime peak is marked as such.
    In a fresh process: this one's heap may hand a freed block back without the RSS moving."""
    import subprocess
    import sys

    script = (
        "import json, torch\n"
        "from decodebench.engine import memory\n"
        "earlier = torch.ones(64 * 2**20); earlier.add_(1); del earlier  # 256 MiB an earlier cell held\n"
        "lifetime = memory.peak_memory('cpu')\n"
        "memory.reset_peak_memory('cpu')\n"
        "print(json.dumps([lifetime, memory.peak_memory('cpu')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    lifetime, run = json.loads(out.splitlines()[-1])
    assert lifetime["peak_rss_scope"] == "process"
    if run["peak_rss_scope"] == "run":  # Linux with a writable /proc/self/clear_refs
        assert run["peak_rss_bytes"] < lifetime["peak_rss_bytes"] - 200 * 2**20
    monkeypatch.setattr(memory, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    monkeypatch.setattr(memory, "_scope", {"rss": "process"})
    memory.reset_peak_memory("cpu")
    assert memory.peak_memory("cpu")["peak_rss_scope"] == "process"
