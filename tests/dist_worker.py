"""One rank of the data-parallel tests, started by torchrun (tests/test_distributed.py).

``torchrun --standalone --nproc_per_node=2 tests/dist_worker.py JOBS.json OUT.json`` trains every job
(``{"name": ..., "overrides": [...]}``) in turn, in one process group. After each run the ranks
compare what they hold: the telemetry history (every rank records the global values), the
stabilizers' device state, and (DDP) the weights. Rank 0 writes each job's run id, whether the
ranks agreed, and (FSDP) the norm of its own gradient shard next to the global norm, which a
norm computed from the local shard alone would have logged.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gradlab.config import compose_config  # noqa: E402
from gradlab.distributed import plain  # noqa: E402
from gradlab.stabilizers import total_norm  # noqa: E402
from gradlab.training import Trainer, train  # noqa: E402


def flat(state) -> list:
    """Every tensor in a nested state, as lists (to compare across ranks)."""
    if torch.is_tensor(state):
        return plain(state).detach().cpu().double().flatten().tolist()
    if isinstance(state, dict):
        return [flat(state[k]) for k in sorted(state, key=str)]
    if isinstance(state, (list, tuple)):
        return [flat(v) for v in state]
    return state


def same_everywhere(value) -> bool:
    """Whether every rank holds ``value`` (compared as JSON text, so NaN equals NaN)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, json.dumps(value))
    return all(g == gathered[0] for g in gathered)


def shard_norm(trainer: Trainer) -> float:
    """The L2 norm of this rank's gradient shards only: what the field's common bug logs."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in trainer.engine.stack.params]
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def run_job(job: dict, out_dir: Path) -> dict:
    cfg = compose_config(job["overrides"])
    if cfg.trainer.resume:
        result = train(cfg, out_dir / job["name"], overrides=job["overrides"])
        return {"run_id": result.run_id}
    trainer = Trainer(cfg, out_dir / job["name"])
    result = trainer.fit()
    h = trainer.history
    record = {"run_id": result.run_id, "rank": dist.get_rank(),
              "history_agrees": same_everywhere(flat(h.state_dict())),
              "stabilizers_agree": same_everywhere(flat(trainer.engine.stack.state_dict()))}
    if cfg.trainer.strategy == "ddp":
        record["weights_agree"] = same_everywhere(flat(trainer.engine.model.module.state_dict()))
    else:
        record["shard_norm"] = shard_norm(trainer)
        record["global_norm"] = float(total_norm([p.grad for p in trainer.engine.stack.params]))
    return record


def main(jobs_file: str, out_file: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text())
    out_dir = Path(out_file).parent
    results = {job["name"]: run_job(job, out_dir) for job in jobs}
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
