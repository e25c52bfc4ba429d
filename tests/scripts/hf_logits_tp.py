"""Load converted (TP1) checkpoints at TP=2 or EP=2 and compare gathered logits with saved references (torchrun, 2 ranks).

Usage: hf_logits_tp.py OUT.json TP EP CKPT1 REF1.pt [CKPT2 REF2.pt ...]. Each REF.pt holds ``tokens`` [b, s] and
the transformers ``logits`` [b, s, V]. Rank 0 writes one record per checkpoint.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def gathered_logits(ckpt: str, tokens: torch.Tensor, parallel, pg) -> tuple[torch.Tensor, int]:
    from megatron_ddk.checkpointing import load_model_state, read_metadata
    from megatron_ddk.config import PrecisionConfig
    from megatron_ddk.data.tokenizer import padded_vocab_size
    from megatron_ddk.models.gpt import build_gpt_model

    meta = read_metadata(ckpt)
    tp = parallel.tensor_model_parallel_size
    model = build_gpt_model(
        meta.model,
        parallel,
        PrecisionConfig(),
        pg=pg,
        padded_vocab_size=padded_vocab_size(
            meta.model.vocab_size, tp, meta.model.make_vocab_size_divisible_by
        ),
        pre_process=True,
        post_process=True,
        initialize_weights=False,
    )
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))  # anything the load does not write shows up as NaN
    load_model_state(ckpt, model)
    model.eval()
    b, s = tokens.shape
    with torch.no_grad():
        local = model(tokens, torch.arange(s).expand(b, s), None)  # [b, s, Vp / TP]
    group = pg.tp
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1), local.shape[-1]  # [b, s, Vp]


def main() -> None:
    from megatron_ddk.config import ParallelConfig
    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize, set_seed

    out, tp, ep, pairs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    pg = initialize(
        ParallelLayout(world_size=2, tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    )
    set_seed(1234, pg)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    records = []
    for ckpt, ref_path in zip(pairs[::2], pairs[1::2]):
        ref = torch.load(ref_path, weights_only=True)
        logits, local_columns = gathered_logits(ckpt, ref["tokens"], parallel, pg)
        vocab = ref["logits"].shape[-1]
        both = [torch.empty_like(logits) for _ in range(2)]
        dist.all_gather(both, logits)
        records.append(
            {
                "ckpt": ckpt,
                "tp": tp,
                "ep": ep,
                "local_columns": local_columns,
                "padded_columns": logits.shape[-1],
                "max_abs_diff": (logits[..., :vocab] - ref["logits"]).abs().max().item(),
                "padding_max_abs": logits[..., vocab:].abs().max().item(),
                "ranks_agree": torch.equal(both[0], both[1]),
            }
        )
    if dist.get_rank() == 0:
        out.write_text(json.dumps(records, indent=2))
    destroy()


if __name__ == "__main__":
    main()
