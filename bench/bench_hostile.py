"""Hostile and broken folders dropped into a served daemon with the default config.

`kiln init`'s config (only the HTTP port is any free one), `kiln serve` in its own
process; each case is built in a staging folder inside the models folder, then renamed
into place as a new version, one after another. For each: what the daemon did (the
checkpoint's status and reason, or the log line of a folder it skips), how long from the
rename until it said so, and the peak resident memory of any worker meanwhile (``VmHWM``
of every process under the daemon, read every 0.2 s). A good checkpoint dropped last must
still be promoted.

Run: .venv/bin/python bench/bench_hostile.py [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_first_promotion import descendants, peak_rss_bytes
from common import Serve, kiln_folder, print_table


def tiny_hf(folder: Path, **config) -> None:
    from test_formats import tiny_bert

    tiny_bert(folder, **config)


def tiny_onnx(folder: Path) -> None:
    from test_formats import export_onnx

    exported = export_onnx(folder / "x")
    shutil.move(str(exported / "model.onnx"), folder / "model.onnx")
    shutil.rmtree(folder / "x")


def zip_bomb(folder: Path) -> None:
    """eval.npz whose inputs array unpacks to 6 GiB of zeros (a few MB on disk)."""
    tiny_onnx(folder)
    header = b"\x93NUMPY\x01\x00"
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (1572864, 1024), }"
    text += " " * (118 - len(text)) + "\n"
    with zipfile.ZipFile(folder / "eval.npz", "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        with archive.open("inputs.npy", "w", force_zip64=True) as member:
            member.write(header + len(text).to_bytes(2, "little") + text.encode())
            zeros = bytes(64 * 2**20)
            for _ in range(96):
                member.write(zeros)
        import numpy as np
        from io import BytesIO

        labels = BytesIO()
        np.save(labels, np.zeros(1572864, np.int64))
        archive.writestr("labels.npy", labels.getvalue())


def constant_of_shape(folder: Path) -> None:
    """An ONNX model whose one node makes a 100,000 x 100,000 float tensor (40 GB)."""
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [100_000, 100_000])
    nodes = [helper.make_node("Constant", [], ["s"], value=shape),
             helper.make_node("ConstantOfShape", ["s"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))


def pickle_with_code(folder: Path) -> None:
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/kiln-hostile-pwned",))

    torch.save({"w": Evil()}, folder / "model.pt")


def cases(outside: Path) -> dict:
    def with_files(*makers):
        def make(folder):
            for maker in makers:
                maker(folder)
        return make

    def link(name, target):
        return lambda folder: os.symlink(target, folder / name)

    def write(name, data):
        return lambda folder: (folder / name).write_bytes(data)

    def nested(folder):
        deep = folder
        for _ in range(1100):  # os.makedirs recurses once per level
            deep = deep / "d"
            deep.mkdir()

    def sparse(folder):
        with open(folder / "padding.bin", "wb") as handle:
            handle.truncate(200 * 2**30)

    def nan_calibration(folder):
        import numpy as np

        np.savez(folder / "calibration.npz", inputs=np.full((8, 4), np.nan, np.float32))

    return {
        "version folder is a symlink": ("link", with_files()),
        "symlink loop inside": ("dir", with_files(tiny_onnx, link("a", "b"), link("b", "a"))),
        "symlink to /etc/passwd inside": ("dir", with_files(tiny_onnx, link("passwd", "/etc/passwd"))),
        "dangling symlink inside": ("dir", with_files(tiny_onnx, link("gone.bin", "nowhere"))),
        "file name not UTF-8": ("dir", with_files(tiny_onnx, write(b"caf\xe9".decode("utf-8", "surrogateescape"),
                                                                   b"x"))),
        "1,100 nested folders": ("dir", with_files(tiny_onnx, nested)),
        "eval.npz bomb (6 GiB of zeros)": ("dir", zip_bomb),
        "plain .npy named eval.npz": ("dir", with_files(tiny_onnx, lambda f: __import__("numpy").save(
            open(f / "eval.npz", "wb"), __import__("numpy").zeros((4, 4), "float32")))),
        "NaN calibration data": ("dir", with_files(tiny_onnx, nan_calibration)),
        "config.json: vocab_size 25 M": ("dir", lambda f: tiny_hf(f, vocab_size=25_000_000)),
        "config.json: 10,000 layers": ("dir", lambda f: tiny_hf(f, num_hidden_layers=10_000)),
        "ONNX ConstantOfShape 100k x 100k": ("dir", constant_of_shape),
        "200 GiB sparse file": ("dir", with_files(tiny_onnx, sparse)),
        "pickle that runs code": ("dir", pickle_with_code),
        "safetensors header of 2**60 bytes": ("dir", write("model.safetensors", (2**60).to_bytes(8, "little") + b"{}")),
        "a good checkpoint, last": ("dir", tiny_hf),
    }


def workers(daemon_pid: int) -> list[int]:
    """The processes forked by the daemon's fork server: its workers."""
    for pid in descendants(daemon_pid):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                command = fh.read()
        except (OSError, ValueError):
            continue
        if parent == daemon_pid and b"forkserver" in command:
            return descendants(pid)
    return []


def main():
    from modelkiln.config import load_config
    from modelkiln.store import queries
    from modelkiln.store.db import open_store

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each case")
    args = parser.parse_args()
    folder = kiln_folder()
    models = folder / "models"
    outside = folder / "outside"
    outside.mkdir()
    tiny_onnx(outside)
    serve = Serve(folder)
    serve.wait_started(120)
    config = load_config(folder / "kiln.toml")
    store = open_store(config)
    chosen = cases(outside)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    rows = []
    try:
        for number, (name, (kind, make)) in enumerate(chosen.items(), 1):
            model = "good" if name.startswith("a good") else f"case{number}"
            final = models / model / "1"
            final.parent.mkdir(parents=True, exist_ok=True)
            offset = (folder / "serve.log").stat().st_size
            if kind == "link":
                os.symlink(outside, final)
            else:
                staging = models / f".staging{number}"
                staging.mkdir()
                make(staging)
                os.rename(staging, final)
            dropped = time.time()
            peak, outcome = 0, None
            while time.time() - dropped < args.timeout and outcome is None:
                for pid in workers(serve.process.pid):
                    peak = max(peak, peak_rss_bytes(pid))
                with store.session() as session:
                    checkpoint = next(iter(queries.checkpoints(session, model)), None)
                    promoted = [p for p in queries.current_promotions(session) if p.model == model]
                    if promoted:  # the first promotion: the daemon is serving it
                        outcome = ("promoted", f"{promoted[0].variant.runtime}:{promoted[0].variant.recipe or 'baseline'}"
                                               f" ({promoted[0].reason})")
                    elif checkpoint is not None and checkpoint.status in ("rejected", "failed", "done", "duplicate"):
                        outcome = (checkpoint.status, checkpoint.reason or "")
                with open(folder / "serve.log", "rb") as log:
                    log.seek(offset)
                    for line in log.read().decode(errors="replace").splitlines():
                        if str(final) in line and ("skipped" in line or "cannot ingest" in line
                                                   or "not ingested yet" in line):
                            outcome = ("not ingested (logged)", line.split(": ", 1)[-1])
                time.sleep(0.2)
            took = time.time() - dropped
            outcome = outcome or ("no answer", f"nothing within {args.timeout:.0f} s")
            rows.append([name, outcome[0], f"{took:.1f}", f"{peak / 2**30:.2f}",
                         outcome[1].replace(str(models), "models")[:150]])
            print(rows[-1], flush=True)
    finally:
        serve.stop()
        store.dispose()
    pwned = Path("/tmp/kiln-hostile-pwned").exists()
    print_table(f"hostile folders into `kiln serve` (default config; {folder})", rows,
                ["case", "outcome", "s to answer", "worker peak GiB", "reason / log line"])
    print(f"\ncode from the pickle ran: {'YES' if pwned else 'no'}")
    print(json.dumps({"cases": len(rows)}))


if __name__ == "__main__":
    main()
