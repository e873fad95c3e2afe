"""Both FSDP simulations of tests/test_fsdp.py in one launch of two CPU ranks (gloo).

``python tests/fsdp_sim_worker.py <out dir>`` (with ``PYTHONPATH=tests``) runs, for LoRA and
for full fine-tuning, ``trainer=fsdp_sim`` through ``llamahome.train.train``: 4 planned steps
stopped after step 2 (a sharded ``last.ckpt`` directory), then a new fit from that checkpoint
to step 4. Lightning starts rank 1 by re-running this script, and every rank then runs the four
fits in the same order; later fits find the process group up and launch nothing. One launch
instead of four keeps the simulation inside the default suite's time budget (interpreter and
library start-up on two processes is most of a fit here).
"""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import TINY_TRAIN, compose

#: The runs compared. Per-rank batches of 2 over 2 ranks = the single-process batch of 4 with
#: the same seed (Lightning's DistributedSampler and our epoch-seeded sampler draw the same
#: permutation). LoRA dropout off: ranks and a single process would draw different masks.
RUN = (
    *TINY_TRAIN,
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "validate_before_fit=false",
    "+callbacks.losses._target_=scaleout_helpers.LossRecorder",
)
CASES = {"lora": ("peft=lora", "peft.lora_dropout=0"), "full": ("peft=none",)}
#: The full run's last fit exports: the weights gathered from the shards, against one process's.
EXPORTS = {"lora": False, "full": True}
#: FSDP side only: activation checkpointing (recomputation must not change a loss) under LoRA.
SIM_ONLY = {"lora": ("model.gradient_checkpointing=true",), "full": ()}
PER_RANK_BATCH = ("data.batch_size=2",)


def main(out: Path) -> None:
    """Run every case: fit to the stop at step 2, then resume from the sharded checkpoint."""
    import torch

    from llamahome.train import train

    torch.set_num_threads(1)  # conftest sets 2; two ranks on two cores want one each
    for name, extra in CASES.items():
        run = out / name
        args = (*RUN, *extra, *SIM_ONLY[name], "trainer=fsdp_sim", *PER_RANK_BATCH)
        stop = ("+callbacks.stop._target_=scaleout_helpers.StopAtStep", "+callbacks.stop.step=2")
        train(compose("train", (*args, *stop, "export=false"), run))
        train(compose("train", (*args, "ckpt_path=last", f"export={EXPORTS[name]}"), run))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
