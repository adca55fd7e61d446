"""
Several processes (torchrun) and memory saving at scale, for distill.py: DDP, FSDP2 sharding of
the student and the frozen teacher, activation checkpointing (--grad-ckpt), and gathering the
sharded student and optimizer state onto rank 0 for an ordinary checkpoint. distill.py imports
setup_processes and wrap_models; docs/SCALING.md has the measurements.

    torchrun --nproc_per_node 8 distill.py ...                                  # DDP
    torchrun --nproc_per_node 4 distill.py --fsdp --grad-ckpt --init DIR ...    # FSDP2
"""
import functools
import os

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from model import Transformer
from training.options import ConfigError


def setup_processes(cfg):
    """(rank, world, device) of this run: one process, or one of torchrun's."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.fsdp and "RANK" not in os.environ:
        raise ConfigError("--fsdp shards across torchrun's processes: run it as torchrun "
                          "--nproc_per_node N distill.py --fsdp ... (N >= 1)")
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    return torchrun_process(cuda)


def torchrun_process(cuda):
    """(rank, world, device) of a torchrun process: nccl on CUDA, gloo on the CPU."""
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def ranks_identical(model, world):
    """All ranks hold the same weights (DDP's promise, checked at every save)."""
    if world == 1:
        return True
    with torch.no_grad():
        sums = torch.stack([torch.cat([p.detach().double().flatten() for p in model.parameters()]).sum(),
                            sum((p.detach().double() ** 2).sum() for p in model.parameters())])
    gathered = [torch.zeros_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums.to(next(model.parameters()).device))
    return all(torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered)


def checkpoint_blocks(model):
    """--grad-ckpt: each block keeps only its input for backward and recomputes the rest there,
    one block at a time. Only the block's forward is wrapped, so parameter names (and with them
    the saved checkpoint) stay the same."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def shard(model, mp_policy, reshard_root):
    """FSDP2: one shard group per block (all-gathered just before it runs, freed after) and the
    root group: embeddings, final norm and lm_head. A tied lm_head IS embed.weight, so the two
    must live in one group: the root. reshard_root: free the root's gathered weights after
    forward too (the teacher: no backward follows; None leaves FSDP's default for a root)."""
    from torch.distributed.fsdp import fully_shard    # here: only --fsdp pays for the import (~1 s)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy, reshard_after_forward=reshard_root)


def wrap_for_processes(student, teacher, fsdp, grad_ckpt, bf16):
    """(student, teacher) with --grad-ckpt, then FSDP2 (--fsdp). On CUDA (bf16): bf16 gathered
    weights and compute, fp32 master weights (the shards, which AdamW updates) and fp32
    gradient reduce-scatter; on the CPU everything stays fp32. DDP comes after torch.compile
    (ddp below)."""
    if grad_ckpt:
        checkpoint_blocks(student)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        shard(student, MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                            reduce_dtype=torch.float32 if bf16 else None), None)
        if teacher is not None:     # frozen, already bf16 on CUDA (distill.load_models): no casts
            shard(teacher, MixedPrecisionPolicy(), True)
    return student, teacher


def wrap_models(student, teacher, cfg, world, bf16):
    """(student, teacher) as distill's loop calls them: --grad-ckpt and --fsdp, then
    torch.compile, then DDP when there are several processes without --fsdp."""
    if cfg.grad_ckpt or cfg.fsdp:
        student, teacher = wrap_for_processes(student, teacher, cfg.fsdp, cfg.grad_ckpt, bf16)
    if cfg.compile:
        student = torch.compile(student)
        teacher = torch.compile(teacher) if teacher is not None else None
    if world > 1 and not cfg.fsdp:
        student = ddp(student)
    return student, teacher


def ddp(student):
    """Several processes without --fsdp: every rank holds the whole student; gradients are
    all-reduced after the step's last micro-batch (distill.train_step uses no_sync before)."""
    return torch.nn.parallel.DistributedDataParallel(student)


def gather_for_saving(raw, opt):
    """(a plain Transformer, the optimizer's state dict) for rank 0 to save, gathered from every
    rank's FSDP shards (a collective: every rank calls this) onto rank 0's CPU, the optimizer
    state keyed by parameter name; the other ranks get (None, None)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    params = get_model_state_dict(raw, options=full)
    optim = get_optimizer_state_dict(raw, opt, options=full)
    if not params:                                       # cpu_offload: rank 0 holds everything
        return None, None
    with torch.device("meta"):                           # no second copy: take the gathered tensors
        model = Transformer(raw.cfg)
    model.load_state_dict(params, strict=True, assign=True)
    if raw.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model, optim      # (its rope buffer stays on "meta": save_pretrained writes parameters)


def load_sharded_optimizer_state(raw, opt, optim_state):
    """The saved full optimizer state into opt under FSDP: each rank takes its shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(raw, opt, optim_state, options=StateDictOptions(full_state_dict=True))
    for state in opt.state.values():     # copies: the shards (and the step counts) may still be
        for name, value in state.items():    # views of the memory-mapped file the next save deletes
            if torch.is_tensor(value):
                state[name] = value.clone()
