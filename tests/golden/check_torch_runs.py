"""Issue 12's done-when, on torch checkpoints made afresh (not the committed fixtures).

Run in a scratch venv with ``torch`` (and, for the last check, ``transformers``) and ema-cli
installed; neither is a dependency of ema-cli::

    /tmp/torchvenv/bin/python tests/golden/check_torch_runs.py [--seed N] [--steps K]

1. Plain state_dicts of a small model (an embedding tied to the output layer, BatchNorm with
   its int64 counter, float16 and bfloat16 parameters) saved by ``torch.save`` after every
   step: ``--decay 0.9 --num-updates step -o ema.pt`` loads with ``torch.load(weights_only=
   True)``, every float tensor bit-equal to TF's EMA computed here independently (float32
   shadow, ``c = 1 - min(0.9, (1+n)/(10+n))``, half types rounded once), the tie kept.
2. Lightning-style ``.ckpt`` dicts with Adam state: the output's ``state_dict`` is that EMA;
   ``optimizer_states``, ``epoch``, ``global_step`` and ``hyper_parameters`` are the last's.
3. Trainer-style ``checkpoint-N/`` folders (``pytorch_model.bin`` and ``config.json``)
   average into a model folder that ``from_pretrained`` loads (skipped without transformers).
4. A checkpoint whose pickle calls ``os.system`` exits 2 with one line, and the call never
   happens.
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch


def ema_cli(*args: object) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ema_cli", "average", *map(str, args), "-q"]
    return subprocess.run(command, capture_output=True, text=True)


def run_ok(*args: object) -> None:
    done = ema_cli(*args)
    if done.returncode != 0:
        sys.exit(f"FAILED: ema-cli average {' '.join(map(str, args))}\n{done.stderr}")


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        sys.exit(1)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.f16 = torch.nn.Linear(6, 6).half()
        self.b16 = torch.nn.Linear(6, 6).to(torch.bfloat16)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids))
        h = h + self.f16(h.half()).float() + self.b16(h.to(torch.bfloat16)).float()
        return self.head(h)


def tf_ema(values: list[np.ndarray], steps: list[int], decay: float = 0.9) -> np.ndarray:
    """TF's replay with ``num_updates=step``: a float32 shadow (half types widened exactly),
    ``s -= (s - x) * c`` in float32, rounded once to the tensor's dtype."""
    shadow = values[0].astype(np.float32)
    for x, n in zip(values, steps, strict=True):
        d = min(
            np.float32(decay), (np.float32(1) + np.float32(n)) / (np.float32(10) + np.float32(n))
        )
        c = np.float32(1) - np.float32(d)
        shadow = shadow - (shadow - x.astype(np.float32)) * c
    return shadow


def as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def bits(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().flatten().view(torch.uint8).numpy())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)


def rounded(shadow: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    if like.dtype == torch.bfloat16:
        return torch.from_numpy(shadow).to(torch.bfloat16)  # round to nearest even
    return torch.from_numpy(shadow.astype(as_numpy(like).dtype))


def train(seed: int, steps: int) -> tuple[Net, torch.optim.Optimizer, list[dict]]:
    torch.manual_seed(seed)
    net, ids = Net(), torch.randint(0, 11, (32,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, eps=1e-3)
    saved = []
    for k in range(1, steps + 1):
        loss = net(ids).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        saved.append({"step": 10 * k, "state": {n: t.detach().clone() for n, t in net.state_dict().items()},
                      "optimizer": opt.state_dict()})  # fmt: skip
    return net, opt, saved


def plain_and_lightning(folder: Path, seed: int, steps: int) -> None:
    net, _, saved = train(seed, steps)
    paths, ckpts = [], []
    for s in saved:
        path = folder / f"ckpt-{s['step']}.pt"
        torch.save(net.state_dict() if s is saved[-1] else s["state"], path)
        paths.append(path)
        lightning = folder / f"epoch=0-step={s['step']}.ckpt"
        torch.save(
            {
                "epoch": 0,
                "global_step": s["step"],
                "state_dict": s["state"],
                "optimizer_states": [s["optimizer"]],
                "hyper_parameters": {"lr": 1e-2, "name": f"run-{seed}"},
                "pytorch-lightning_version": "2.5.0",
            },
            lightning,
        )
        ckpts.append(lightning)
    step_numbers = [s["step"] for s in saved]
    run_ok(*paths, "-o", folder / "ema.pt", "--decay", "0.9", "--num-updates", "step")
    out = torch.load(folder / "ema.pt", weights_only=True)
    inputs = [torch.load(p, weights_only=True) for p in paths]
    ok = True
    for name, tensor in out.items():
        if not tensor.is_floating_point():
            ok &= torch.equal(tensor, inputs[-1][name])
            continue
        want = rounded(tf_ema([as_numpy(i[name]) for i in inputs], step_numbers), tensor)
        ok &= tensor.dtype == inputs[-1][name].dtype and same_bits(tensor, want)
    check(
        ok,
        f"plain .pt ({len(out)} tensors, f32/f16/bf16): torch.load(weights_only=True), every float tensor is TF's EMA bit for bit",
    )
    check(
        out["embed.weight"].untyped_storage().data_ptr()
        == out["head.weight"].untyped_storage().data_ptr(),
        "plain .pt: the tied embedding and output layer still share one storage",
    )

    run_ok(*ckpts, "-o", folder / "ema.ckpt", "--decay", "0.9", "--num-updates", "step")
    got = torch.load(folder / "ema.ckpt", weights_only=True)
    last = torch.load(ckpts[-1], weights_only=True)
    states = [torch.load(c, weights_only=True)["state_dict"] for c in ckpts]
    ok = set(got) == set(last)
    for name, tensor in got["state_dict"].items():
        if tensor.is_floating_point():
            want = rounded(tf_ema([as_numpy(s[name]) for s in states], step_numbers), tensor)
            ok &= same_bits(tensor, want)
        else:
            ok &= torch.equal(tensor, last["state_dict"][name])
    check(ok, "Lightning .ckpt: state_dict is the EMA")
    same = (
        got["epoch"] == last["epoch"]
        and got["global_step"] == last["global_step"]
        and got["hyper_parameters"] == last["hyper_parameters"]
        and pickle.dumps(_plain(got["optimizer_states"]))
        == pickle.dumps(_plain(last["optimizer_states"]))
    )
    check(
        same,
        "Lightning .ckpt: optimizer_states, epoch, global_step, hyper_parameters are the last checkpoint's",
    )


def _plain(value: object) -> object:
    """Tensors as bytes, for comparing nested structures."""
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), bits(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def trainer_folders(folder: Path, seed: int, steps: int) -> None:
    try:
        import transformers
    except ImportError:
        print("skip  Trainer folders: transformers is not installed")
        return
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ids = torch.randint(0, 50, (2, 16))
    runs = []
    for k in range(1, steps + 1):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        out = folder / "trainer" / f"checkpoint-{5 * k}"
        model.save_pretrained(out, safe_serialization=False)
        torch.save(opt.state_dict(), out / "optimizer.pt")
        runs.append(out)
    for fmt in ("safetensors", "torch"):
        target = folder / f"hf-{fmt}"
        run_ok(*runs, "-o", target, "--decay", "0.9", "--folder-format", fmt)
        loaded = transformers.GPT2LMHeadModel.from_pretrained(target)
        files = sorted(p.name for p in target.iterdir())
        check(
            loaded.config.n_layer == 2 and "config.json" in files and "optimizer.pt" not in files,
            f"Trainer folders -> {fmt} model folder ({', '.join(files)}): from_pretrained loads it",
        )


def hostile(folder: Path) -> None:
    marker = folder / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return (os.system, (f"touch {marker}",))

    good = folder / "good"
    good.mkdir()
    torch.save({"w": torch.zeros(3)}, good / "ckpt-1.pt")
    evil = good / "ckpt-2.pt"
    torch.save({"w": torch.zeros(3)}, evil)
    with zipfile.ZipFile(evil) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    (pkl,) = [n for n in members if n.endswith("/data.pkl")]
    members[pkl] = pickle.dumps({"w": Evil()}, protocol=2)
    with zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    done = ema_cli(good / "ckpt-1.pt", evil, "-o", folder / "x.pt", "--decay", "0.9")
    lines = done.stderr.strip().splitlines()
    check(
        done.returncode == 2
        and len(lines) == 1
        and "posix.system" in lines[0]
        and not marker.exists(),
        f"a pickle calling os.system is refused ({lines[0] if lines else done.stderr!r}) and never runs",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, seed {args.seed}")
    with tempfile.TemporaryDirectory() as tmp:
        plain_and_lightning(Path(tmp), args.seed, args.steps)
        trainer_folders(Path(tmp), args.seed, args.steps)
        hostile(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
