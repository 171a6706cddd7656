"""The training step: no host sync per step (the non-finite flag and the loss sums live on the
device and are read every log_every steps), traceable by torch.compile(fullgraph=True), and
capturable in a CUDA graph on a GPU."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_train import _all_state, tiny_cfg  # noqa: E402

from fastmask.train import NonFiniteLossError, Trainer, train  # noqa: E402


def test_host_reads_the_device_once_per_log_interval_and_names_the_first_bad_step(tmp_path, monkeypatch):
    calls = []
    real = Trainer._sync

    def counting(self, *a, **k):
        calls.append(self.step)
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "_sync", counting)
    train(tiny_cfg(tmp_path / "a", steps=12, finetune_steps=0, log_every=4), progress=False)
    assert calls == [4, 8, 12, 12]  # three log intervals and the final checkpoint; no per-step read

    def poison(step, loss):
        return loss * float("inf") if step == 5 else loss

    calls.clear()
    with pytest.raises(NonFiniteLossError, match=r"the loss is inf at step 5 \(phase 1"):
        train(tiny_cfg(tmp_path / "b", steps=12, finetune_steps=0, log_every=4), hooks={"loss": poison}, progress=False)
    assert calls == [4, 8]  # found at the second read, still naming step 5


@pytest.mark.parametrize("arch", ["maskdit", "sprint"])  # SPRINT: the path-drop flags are one more input
def test_training_step_compiles_with_fullgraph_on_cpu(tmp_path, arch):
    torch._dynamo.reset()
    cfg = dict(steps=3, finetune_steps=0, log_every=3, arch=arch)
    eager = train(tiny_cfg(tmp_path / "e", **cfg), progress=False)
    compiled = train(tiny_cfg(tmp_path / "c", **cfg), progress=False, compile_step={"backend": "aot_eager"})
    a, b = _all_state(eager), _all_state(compiled)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    torch._dynamo.reset()


@pytest.mark.gpu
def test_training_step_captures_in_a_cuda_graph(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch._dynamo.reset()
    cfg = dict(steps=6, finetune_steps=0, log_every=3, device="cuda", amp="fp32")
    eager = train(tiny_cfg(tmp_path / "e", **cfg), progress=False)
    # no synchronising call inside the steps between two reads of the flag
    real = Trainer._train_step

    def strict(self, phase):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, phase)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    Trainer._train_step = strict
    try:
        graphed = train(tiny_cfg(tmp_path / "g", **cfg), progress=False, compile_step={"mode": "reduce-overhead"})
    finally:
        Trainer._train_step = real
    a, b = _all_state(eager), _all_state(graphed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=lambda m: f"{k}: {m}")
    torch._dynamo.reset()
