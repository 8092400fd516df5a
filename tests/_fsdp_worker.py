"""One rank of tests/test_fsdp.py under torchrun: FSDP2-shard a tiny GPT-2 and run the sharded estimators.

Arguments: the saved state_dict, the saved token batches, the output .npz (written by rank 0). Rank 0
writes the gathered products of three probe vectors, the top-3 eigenvalues with their bounds, a
Hutchinson trace, an SLQ density and the operator's report (ε, δ, counts).
"""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

from lossatlas.curvature.sharded import ShardedHessianOperator, shard_model
from lossatlas.errors import UserError
from lossatlas.estimators.sharded_vectors import sharded_hutchinson_trace, sharded_lanczos_eigs, sharded_slq_density

CONFIG = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0,
              attn_implementation="eager")


def tiny_gpt2() -> torch.nn.Module:
    """The test's GPT-2: one layer, width 16, two heads, 32 tokens, float64, dropout off (eval)."""
    return GPT2LMHeadModel(GPT2Config(**CONFIG)).double().eval()


def main(state_path: str, data_path: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    model = tiny_gpt2()
    model.load_state_dict(torch.load(state_path))
    batches = [tuple(b) for b in torch.load(data_path)]
    shard_model(model)
    try:  # exact double backward is refused under FSDP with the reason
        ShardedHessianOperator(model, batches, "causal_lm", path="double_backward")
        refused = ""
    except UserError as exc:
        refused = str(exc)
    op = ShardedHessianOperator(model, batches, "causal_lm")
    V = op.space.probes(range(3), "normal", 123, op.dtype, op.device)  # this rank's entries of 3 global vectors
    products = op.gather(op @ V)
    top = sharded_lanczos_eigs(op, 3, tol=1e-7, seed=0, return_eigenvectors=True)
    vecs = op.gather(top.eigenvectors)
    tr = sharded_hutchinson_trace(op, 16, seed=1)
    dens = sharded_slq_density(op, num_probes=2, num_steps=12, sigma_squared=1e-3, grid_len=500, seed=2)
    report = op.report()
    probes = op.gather(V)  # a collective: every rank takes part
    if dist.get_rank() == 0:
        np.savez(out_path, probes=probes.numpy(), products=products.numpy(),
                 top=top.eigenvalues, top_bounds=top.error_bounds, top_residuals=top.residuals,
                 top_converged=top.converged, top_vectors=vecs.numpy(),
                 trace=tr.value, trace_samples=tr.samples, trace_bound=tr.product_bound,
                 nodes=dens.nodes, weights=dens.weights, density=dens.density, grid=dens.grid,
                 moment_bounds=dens.moment_bounds, local_sizes=np.array([op.space.local_size]),
                 report=json.dumps(report), refused=refused)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
