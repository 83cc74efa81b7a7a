"""Data loaders: the GPTQ text recipes, MMLU CSV parsing, reasoning items, bad input."""

from __future__ import annotations

import pytest

from edgellm.errors import InvalidArgumentError
from edgellm.eval.data import (
    SUBJECT_CATEGORY,
    load_corpus,
    load_task,
    mmlu_dir,
    mmlu_subjects,
    ptb_gptq_text,
    read_mmlu_csv,
    wikitext_gptq_text,
)


def test_wikitext_recipe_matches_hf_rows():
    raw = " \n = Robert Boulter = \n \n Robert is an actor . \n"
    # HF rows: "", " = Robert Boulter = \n", "", " Robert is an actor . \n"
    assert wikitext_gptq_text(raw) == "\n\n = Robert Boulter = \n\n\n\n\n Robert is an actor . \n"


def test_ptb_recipe_joins_stripped_lines():
    assert ptb_gptq_text(" a b \n c d \n") == "a b c d"


def test_shared_corpora(data_dir):
    wt = load_corpus("wikitext2", data_dir=data_dir)
    assert wt.text.startswith("\n\n = Robert Boulter = \n\n\n\n")
    assert wt.text.count("\n\n") >= 4357
    raw = load_corpus("wikitext2", protocol="llamacpp", data_dir=data_dir)
    assert raw.text == (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()
    ptb = load_corpus("ptb", data_dir=data_dir)
    assert ptb.text.startswith("no it was n't black monday but while")
    assert len(ptb.text.split()) == 78669


def test_local_file_and_missing_path(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello\n")
    assert load_corpus(str(f)).text == "hello\n"
    with pytest.raises(InvalidArgumentError):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(InvalidArgumentError):
        load_corpus("wikitext2", data_dir=tmp_path / "missing")


def test_mmlu_files(data_dir):
    folder = mmlu_dir(data_dir)
    subjects = mmlu_subjects(folder)
    assert len(subjects) == 57 and set(subjects) == set(SUBJECT_CATEGORY)
    dev = read_mmlu_csv(folder / "dev" / "college_mathematics_dev.csv")
    assert len(dev) == 5 and "\r\n" in dev[2].question  # embedded CRLF kept as written
    test = read_mmlu_csv(folder / "test" / "abstract_algebra_test.csv")
    assert len(test) == 100 and test[0].answer == "B" and test[0].choices == ["0", "4", "2", "6"]


@pytest.mark.parametrize("task,n,nchoices", [("arc_e", 2376, 4), ("arc_c", 1172, 4), ("piqa", 1838, 2),
                                              ("hellaswag", 10042, 4), ("commonsense_qa", 1221, 5),
                                              ("boolq", 3270, 2), ("winogrande", 1267, 2)])
def test_reasoning_items(data_dir, task, n, nchoices):
    items, _ = load_task(task, data_dir)
    assert len(items) == n
    it = items[0]
    assert len(it.choices) == nchoices and 0 <= it.gold < nchoices
    assert len(it.contexts) == len(it.continuations) == nchoices
    assert all(c.startswith(" ") for c in it.continuations)


def test_winogrande_sentence_rebuilt(data_dir):
    items, _ = load_task("winogrande", data_dir)
    it = items[0]
    assert it.question == "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert it.choices == ["Sarah", "Maria"] and it.gold == 1


def test_unknown_task():
    with pytest.raises(InvalidArgumentError):
        load_task("nope")
