"""Fully sharded data parallel for Llama decoders: FSDP2 (``fully_shard``) through Lightning.

``trainer=fsdp`` (GPUs, NCCL) and ``trainer=fsdp_sim`` (two CPU processes over gloo) build the
same :class:`FSDP2Strategy`, so what the CPU simulation proves (sharding, gradient reduction,
sharded checkpoints, resume) is the code path the GPU run takes.

Why Lightning's ``ModelParallelStrategy`` and not its ``FSDPStrategy``: in Lightning 2.6 the
accelerator connector refuses ``FSDPStrategy`` without CUDA ("The strategy `fsdp` requires a GPU
accelerator, but received `accelerator='cpu'`", ``_check_strategy_and_fallback``; Lightning
issue #21812), while ``ModelParallelStrategy`` runs torch's FSDP2 on any device mesh, CPU
included. FSDP2 also shards each parameter on its own (a ``DTensor``) instead of flattening a
unit's parameters into one buffer, so LoRA needs no special wrapping: frozen base weights never
get a gradient, whichever unit they share with their adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from llamahome.training import sharded_checkpoint

DECODER_LAYERS = ("transformers.models.llama.modeling_llama.LlamaDecoderLayer",)


def _classes(paths: Sequence[str | type]) -> tuple[type, ...]:
    from hydra.utils import get_class

    return tuple(p if isinstance(p, type) else get_class(p) for p in paths)


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds FSDP2-sharded submodules (every rank must then join a forward)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def shard_model(
    model: nn.Module,
    mesh: Any,
    layers: Sequence[str | type] = DECODER_LAYERS,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> nn.Module:
    """Apply ``fully_shard`` to every decoder layer of ``model``, then to ``model`` itself.

    Each layer is one unit: its parameters are all-gathered just before its forward (and again
    for its backward) and its gradients reduce-scattered right after, so at most a layer or two
    is ever whole on a rank. The root unit (the Hugging Face model) takes what is left:
    embeddings, final norm, LM head (tied weights stay together there). Sharding twice is a
    no-op: Lightning calls ``configure_model`` again when ``validate`` precedes ``fit``.

    Args:
        model: The causal LM (plain or PEFT-wrapped), on its device.
        mesh: A one-dimensional data-parallel ``DeviceMesh``.
        layers: Classes (or import paths) of the transformer blocks.
        reshard_after_forward: Free gathered parameters after each forward (ZeRO-3); ``False``
            keeps them until backward (more memory, one all-gather less per layer).
        cpu_offload: Keep sharded parameters, gradients and optimizer steps in CPU memory.

    Returns:
        ``model``, sharded in place.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if is_fully_sharded(model):
        return model
    options = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    blocks = _classes(layers)
    units = [m for m in model.modules() if isinstance(m, blocks)]
    if not units:
        from llamahome.errors import ConfigError

        names = ", ".join(c.__name__ for c in blocks)
        raise ConfigError(
            f"trainer.strategy.layers: the model has no {names} to shard; list the class of its "
            "transformer blocks"
        )
    for unit in units:
        fully_shard(unit, **options)
    # The root is the Hugging Face model, not a PEFT wrapper around it: generate() calls the HF
    # model directly, and the root's hooks (gathering embeddings and head) must run there too.
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    fully_shard(root, **options)
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2 over all ranks, with atomic checkpoints.

    The LightningModule's ``configure_model`` calls :meth:`parallelize` (Lightning's contract for
    this strategy). On top of Lightning's behaviour:

    - every rank is one data-parallel replica (``data_parallel_size`` = world size, no tensor
      parallelism; Lightning's ``"auto"`` would make it all tensor parallel on one node);
    - a sharded checkpoint (one directory, a shard file per rank) is written to a temporary
      directory and swapped in whole, so a kill mid-write keeps the previous checkpoint
      (Lightning writes into the old directory in place);
    - a checkpoint without the frozen base weights (LoRA) resumes: Lightning's sharded loading
      ignores ``strict_loading=False`` (Lightning issue #20274).

    Args:
        layers: Classes (or import paths) of the blocks that become FSDP units.
        reshard_after_forward: See :func:`shard_model`.
        cpu_offload: See :func:`shard_model`.
        save_distributed_checkpoint: ``True``: each checkpoint is a directory of shards, written
            by all ranks in parallel; ``False``: one file gathered on rank 0 (the full state
            must fit in its CPU memory), written through ``AtomicCheckpointIO``.
        process_group_backend: ``None`` picks NCCL on GPUs, gloo on CPUs.
        timeout: Collective timeout.
    """

    def __init__(
        self,
        layers: Sequence[str | type] = DECODER_LAYERS,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.layers = tuple(layers)
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload

    def setup_environment(self) -> None:
        """Make every rank of every node a data-parallel replica, then build the mesh."""
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` over the data-parallel mesh (called from ``configure_model``)."""
        return shard_model(
            model,
            self.device_mesh["data_parallel"],
            layers=self.layers,
            reshard_after_forward=self.reshard_after_forward,
            cpu_offload=self.cpu_offload,
        )

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        """Write ``checkpoint``: a sharded directory swapped in whole, or one gathered file."""
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        sharded_checkpoint.save(checkpoint, self.broadcast(str(filepath)), self)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        """Load a sharded directory (partial for LoRA) or a full file, as Lightning does."""
        path = self.broadcast(str(checkpoint_path))
        module = self.lightning_module
        if not sharded_checkpoint.is_sharded(path) or module is None or module.strict_loading:
            return super().load_checkpoint(path, weights_only)
        return sharded_checkpoint.load_partial(path, self.model, self.optimizers, weights_only)


def gather_full_model(
    model: nn.Module, rebuild: Callable[[], nn.Module], is_global_zero: bool
) -> nn.Module | None:
    """An unsharded copy of a sharded ``model`` on rank 0, for the Hugging Face export.

    Collective: every rank must call it. A model that is not sharded comes back as it is.

    Args:
        model: The trained model, sharded or not.
        rebuild: Builds the same architecture unsharded (random or pretrained weights; all are
            overwritten).
        is_global_zero: Whether this is rank 0, which receives the copy.

    Returns:
        The model with full weights on rank 0; ``None`` on the other ranks of a sharded run.
    """
    if not is_fully_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # The full state lands on rank 0's CPU only (the other ranks receive an empty dict).
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not is_global_zero:
        return None
    full = rebuild()
    with torch.no_grad():
        full.load_state_dict(state, strict=True)
    return full
