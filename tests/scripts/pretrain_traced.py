"""``pretrain_ddk.py`` that also reports what the soak test (tests/soak/kill_resume.py) compares and aims at.

Same arguments as pretrain_ddk.py. Appends every training micro-batch's sample ids to the JSONL file
``$SOAK_SAMPLE_LOG`` and prints a marker line when a phase starts (``@@phase eval`` / ``save`` /
``between``), so that the soak driver can SIGKILL the process at random moments inside each phase.
"""

import json
import os
import sys


def trace() -> None:
    from megatron_ddk.data import loader
    from megatron_ddk.training import trainer

    log = open(os.environ["SOAK_SAMPLE_LOG"], "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
    draw = loader.MixedDomainBatches.__next__

    def traced_next(self):
        batch = draw(self)
        log.write(
            json.dumps(
                {
                    "iteration": self.iteration,
                    "first": int(batch["global_position"][0]),
                    "domain": batch["domain_id"].tolist(),
                    "sample": batch["sample_id"].tolist(),
                }
            )
            + "\n"
        )
        return batch

    evaluate, save = trainer.Trainer.evaluate, trainer.Trainer.save

    def traced_evaluate(self, **kwargs):
        print("@@phase eval", flush=True)
        return evaluate(self, **kwargs)

    def traced_save(self):
        print("@@phase save", flush=True)
        save(self)
        print("@@phase between", flush=True)

    loader.MixedDomainBatches.__next__ = traced_next
    trainer.Trainer.evaluate, trainer.Trainer.save = traced_evaluate, traced_save


if __name__ == "__main__":
    trace()
    import pretrain_ddk

    sys.exit(pretrain_ddk.main(sys.argv[1:]))
