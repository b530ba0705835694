"""The `clip-td` command: every stage as a subcommand (each is also `python -m stages.<name>`)."""

from __future__ import annotations

import importlib
import importlib.util

import click

# Stage name -> module; a module missing from this checkout is left out rather than breaking the group.
STAGES = {
    "prepare-data": "stages.prepare_data",
    "pretrain-teacher": "stages.pretrain_teacher",
    "extract-teacher": "stages.extract_teacher",
    "verify-cache": "stages.verify_cache",
    "pretrain-student": "stages.pretrain_student",
    "zeroshot": "stages.zeroshot",
    "train-student": "stages.train_student",
    "evaluate": "stages.evaluate",
    "report": "stages.report",
    "predict": "stages.predict",
}


class _LazyGroup(click.Group):
    """Imports a stage only when it is run, so `clip-td --help` does not pay for importing torch."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n, m in STAGES.items() if importlib.util.find_spec(m) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = STAGES.get(name.replace("_", "-"))
        if module is None or importlib.util.find_spec(module) is None:
            return None
        return importlib.import_module(module).main


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """clip-td: distil a CLIP teacher, run once into a Zarr cache, into vision-language students.

    Stages run in order prepare-data → pretrain-teacher (embedded default only) → extract-teacher →
    pretrain-student → zeroshot → train-student → evaluate → report; `dvc repro` runs them all from params.yaml.
    predict answers new inputs with a trained student.
    """


if __name__ == "__main__":
    main()
