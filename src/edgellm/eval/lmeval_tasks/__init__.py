"""edgellm's offline lm-evaluation-harness tasks: the YAMLs in this folder (lm-eval's prompts, metrics and
task names) read local files through `loaders.py` instead of the Hugging Face hub. Point lm-eval at them with
`edgellm.eval.lmeval.task_manager()` (or `TaskManager(include_path=<this folder>)`)."""
