"""One node of a multi-node pretrain without Prefect, for the namespace tests (a temporary Prefect
server costs ~30 s per start on the CI box): `python -m tests.stages._node STORE RANK CONFIG INPUTS`
runs pipeline.execute.execute (rank 0: lease, train, commit) or join (rank >= 1) and ends a failure
with the stage's one-line error (`error: ...`) and its full message on stderr, exit 1."""
from __future__ import annotations

import json
import logging
import sys


def main(store_url: str, rank: str, config: str, inputs: str) -> int:
    from artifacts import open_store
    from artifacts.manifest import ArtifactRef
    from stages import pretrain
    from pipeline.execute import execute, join

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    store = open_store(store_url)
    cfg = pretrain.preset("tiny", **json.loads(config))
    refs = {k: ArtifactRef.parse(v) for k, v in json.loads(inputs).items()}
    try:
        if int(rank) == 0:
            print(execute(pretrain, cfg, refs, store).ref, flush=True)
        else:
            join(pretrain, cfg, refs, store)
    except Exception as e:
        # the one line the CLI and the run's table show (a LaunchError's headline), then the rest
        print(f"error: {type(e).__name__}: {getattr(e, 'headline', '') or e}\n{e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
