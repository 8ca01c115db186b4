"""lm_eval task configs over local files: lm_eval's own built-in tasks, reading our files instead of the Hub.

lm_eval ships task YAML but no data; its built-in tasks download from the Hugging Face Hub. An override
YAML that `include`s the built-in one keeps its prompts and metrics and reads a local file:

    include: <lm_eval>/tasks/arc/arc_easy.yaml
    task: forge_arc_fixture
    dataset_path: json
    dataset_name: null
    dataset_kwargs: {data_files: {test: /abs/path/arc.jsonl}}

    forge lm-eval-tasks OUT_DIR bigbench/known_unknowns/task.json my/arc.jsonl
    forge lm-eval --model forge --model_args pretrained=runs/x/hf --include_path OUT_DIR --tasks forge_known_unknowns

A BIG-bench task.json is first converted to the records lm_eval's BIG-bench tasks read (the
hails/bigbench schema: inputs, targets, multiple_choice_targets, multiple_choice_scores), with the
prompt BIG-bench's own formatter writes (trainer.eval.formats.bigbench_examples). Only this module and
trainer.eval.harness import lm_eval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from forge_lm.trainer.eval.formats import TaskFormatError, bigbench_examples, read_task

# format -> (built-in lm_eval task YAML, relative to lm_eval/tasks; the split it evaluates: validation or test)
BUILTIN: dict[str, tuple[str, str]] = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "arc": ("arc/arc_easy.yaml", "test"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "lambada": ("lambada/lambada_openai.yaml", "test"),
    "wikitext": ("wikitext/wikitext.yaml", "test"),
    "bigbench": ("", "test"),  # its split is named "default" (hails/bigbench)
}
BIGBENCH_TEMPLATE = "bigbench/multiple_choice_template_a_yaml"


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def write_task_config(path: str | Path, out_dir: str | Path, name: Optional[str] = None) -> str:
    """Write an lm_eval task YAML (and, for BIG-bench, its converted data) for the task file `path` into
    `out_dir`; returns the lm_eval task name ('forge_<name>'). Pass `out_dir` as lm_eval's include_path."""
    path, out = Path(path).resolve(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = read_task(path, name=name)  # validates the file and gives its name and format
    task_name = f"forge_{task.name}"
    # Every split besides the evaluated one is switched off: only that one exists in the local file.
    config: dict = {"task": task_name, "dataset_path": "json", "dataset_name": None}
    config.update(
        {"training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
    )
    if task.format == "bigbench":
        records, _ = bigbench_examples(path, json.loads(path.read_text(encoding="utf-8")))
        data = out / f"{task_name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        builtin = lm_eval_tasks_dir() / "bigbench" / "multiple_choice" / f"{task.name}.yaml"
        include = builtin if builtin.is_file() else lm_eval_tasks_dir() / BIGBENCH_TEMPLATE
        split_name = "default"
        config["process_docs"] = None  # the records are already multiple-choice ones (lm_eval's filter)
        # lm_eval's BIG-bench tasks report acc; acc_norm is added so that both can be compared.
        config["metric_list"] = [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
        ]
        if _gold_is_best_score(records):
            config["doc_to_target"] = "{{multiple_choice_scores.index(multiple_choice_scores|max)}}"
        data_file = data
    else:
        relative, split_name = BUILTIN[task.format]
        include, data_file = lm_eval_tasks_dir() / relative, path
    config[f"{BUILTIN[task.format][1]}_split"] = split_name
    config["dataset_kwargs"] = {"data_files": {split_name: str(data_file)}}
    lines = [f"include: {json.dumps(str(include))}"] + [f"{k}: {json.dumps(v)}" for k, v in config.items()]
    (out / f"{task_name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return task_name


def _gold_is_best_score(records: list[dict]) -> bool:
    """Whether some example's target is not one of its choices (lm_eval's template B tasks, e.g. strategyqa)."""
    return any(r["targets"] and r["targets"][0] not in r["multiple_choice_targets"] for r in records)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write lm_eval task configs that read local task files (HellaSwag, ARC, PIQA, LAMBADA, "
        "WikiText JSON lines, BIG-bench task.json) with lm_eval's built-in prompts and metrics."
    )
    parser.add_argument("out_dir", help="directory for the YAML files: pass it to lm_eval as --include_path")
    parser.add_argument("files", nargs="+", help="task files ('name:path' to choose the task's name)")
    args = parser.parse_args(argv)
    from forge_lm.trainer.eval.evaluator import parse_task_spec, resolve_task_path

    names = []
    try:
        for spec in args.files:
            name, path = parse_task_spec(spec)
            names.append(write_task_config(resolve_task_path(path), args.out_dir, name))
    except TaskFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"--include_path {args.out_dir} --tasks {','.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
