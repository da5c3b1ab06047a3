"""One process (gloo without torchrun): real Megatron checkpoints of ling-tiny, then the faults
a run meets: a save that hits a full disk in Megatron's writer processes, one that fails in
the files written after them, and a load of a checkpoint whose .metadata is garbled but of the
right size. Prints what happened as one JSON object."""

import argparse
import errno
import json
import os
import shutil
from pathlib import Path


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failed_save(root: Path, step: int, model) -> str:
    from megatron_ring.models.hf_config import CheckpointError
    from megatron_ring.train import checkpoint

    try:
        checkpoint.save(root, step, model, trainer_state={"note": "must fail"})
    except CheckpointError as e:
        return str(e)
    return ""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    a = p.parse_args()
    root = Path(a.root)

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_ring.models.builder import build_model
    from megatron_ring.models.hf_config import CheckpointError
    from megatron_ring.models.presets import get_preset
    from megatron_ring.platform import distributed
    from megatron_ring.train import checkpoint, checkpoint_dir
    
    layout = distributed.init(1, 1)
    model = build_model(get_preset("ling-tiny"), layout)
    for step in (1, 2):
        checkpoint.save(root, step, model, trainer_state={"note": "fine"})
    out = {"saved": sorted(p.name for p in root.iterdir())}

    real_write = filesystem_async._write_item
    filesystem_async._write_item = enospc  # Megatron's forked writers inherit it
    out["writer_enospc"] = failed_save(root, 3, model)
    filesystem_async._write_item = real_write
    out["after_writer_enospc"] = sorted(p.name for p in root.iterdir())

    real_durable = checkpoint_dir.write_durably
    checkpoint_dir.write_durably = enospc  # the manifest, after Megatron's files
    out["manifest_enospc"] = failed_save(root, 3, model)
    checkpoint_dir.write_durably = real_durable
    out["after_manifest_enospc"] = sorted(p.name for p in root.iterdir())
    out["latest"] = (root / "latest").read_text().strip()
    out["complete"] = [p.name for p in checkpoint_dir.complete_checkpoints(root)]

    # Same size, garbage inside (in a copy): the manifest cannot tell; Megatron's reader fails.
    garbled = root.parent / "garbled"
    for name in ("iter_0000001", "iter_0000002"):
        shutil.copytree(root / name, garbled / name)
    metadata = garbled / "iter_0000002" / ".metadata"
    metadata.write_bytes(b"\0" * metadata.stat().st_size)
    try:
        checkpoint.load(garbled / "iter_0000002", model)
        out["garbled_load"] = ""
    except CheckpointError as e:
        out["garbled_load"] = str(e)
    distributed.shutdown()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
