import csv
import json
import re

import pytest

from conftest import shared
from para_mini.data import (
    SYSTEM_PROMPT,
    TASK_FIELDS,
    detect_task,
    load_task,
    one_per_query,
    parse_prediction,
    split,
    truncate,
)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, *records):
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


TABLE = {
    "id": "1-10015132-11",
    "header": ["Player", "No.", "Nationality"],
    "types": ["text", "real", "text"],
    "rows": [["Antonio Lang", 21, "United States"], ["Carlos Arroyo", 4, "Puerto Rico"]],
}


def squad(context, question, answers):  # SQuAD v1.1's nesting: data[].paragraphs[].qas[]
    qa = {"id": "q1", "question": question, "answers": [{"text": a, "answer_start": context.find(a)} for a in answers]}
    return {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": context, "qas": [qa]}]}]}


RECORD = {
    "idx": 0,
    "passage": {"text": "Obama met Merkel in Berlin.", "entities": [{"start": 0, "end": 4}]},
    "qas": [{"idx": 0, "query": "@placeholder visited Germany.", "answers": [{"start": 0, "end": 4, "text": "Obama"}]}],
}
RTE = {"premise": "A cat sat on the mat.", "hypothesis": "An animal sat.", "label": "entailment", "idx": 0}
COPA = {
    "premise": "The man broke his toe.",
    "choice1": "He dropped a hammer on his foot.",
    "choice2": "He got a hole in his sock.",
    "question": "cause",
    "label": 0,
    "idx": 1,
}
WIKISQL = {"phase": 1, "table_id": TABLE["id"], "question": "Who wears number 21?"}
WIKISQL["sql"] = {"sel": 0, "agg": 0, "conds": [[1, 0, 21]]}  # SELECT column 0 WHERE column 1 = 21

# One small file per format, and the query and response the paper's Appendix C templates give for it. The expected
# strings are transcribed from the paper, not from para_mini.data.
NLI_QUESTION = "Are sentence 1 and sentence 2 have entailment relation or not?"
CASES = {
    "boolq": (
        "b.jsonl",
        json.dumps({"question": "is the sky blue", "passage": "Sky -- The sky is blue.", "idx": 3, "label": True}),
        "Reference document:\nSky -- The sky is blue.\nQuestion:\nis the sky blue",
        "yes",
    ),
    "copa": (
        "c.jsonl",
        json.dumps(COPA),
        "Premise:\nThe man broke his toe.\nChoice 1: He dropped a hammer on his foot.\n"
        "Choice 2: He got a hole in his sock.\nQuestion:\nWhat was the CAUSE of this?",
        "1",
    ),
    "rte": (
        "r.jsonl",
        json.dumps(RTE),
        f"sentence 1: A cat sat on the mat.\nsentence 2: An animal sat.\n{NLI_QUESTION}",
        "entailment",
    ),
    "qnli": (
        "dev.tsv",
        "index\tquestion\tsentence\tlabel\n0\tWho sat on the mat?\tThe dog stood.\tnot_entailment\n",
        f"sentence 1: Who sat on the mat?\nsentence 2: The dog stood.\n{NLI_QUESTION}",
        "not entailment",
    ),
    "sst2": (
        "train.tsv",
        'sentence\tlabel\nit \'s a "charming" journey . \t1\n',
        'it \'s a "charming" journey .\nThe sentiment of the given sentence is:',
        "positive",
    ),
    "record": (
        "rec.jsonl",
        json.dumps(RECORD),
        "Context:\nObama met Merkel in Berlin.\nQuestion:\n@placeholder visited Germany.",
        "Obama",
    ),
    "squad": (
        "dev-v1.1.json",
        json.dumps(squad("Paris is in France.", "Where is Paris?", ["France", "in France"])),
        "Context:\nParis is in France.\nQuestion:\nWhere is Paris?",
        "France",
    ),
    "e2e": (
        "devset.csv",
        'mr,ref\n"name[Aromi], eatType[pub]",Aromi is a pub.\n',
        "Reference:\nname[Aromi], eatType[pub]\nGenerate a customer review following the given reference.",
        "Aromi is a pub.",
    ),
    "gsm8k": (
        "g.jsonl",
        json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}),
        "Answer the following math quesition:\nWhat is 2 + 3?\nInstruction: please think step by step.",
        "2 + 3 = <<2+3=5>>5\n#### 5",
    ),
    "wikisql": (
        "dev.jsonl",
        json.dumps(WIKISQL),
        "Answer the following query by writing a SQL query on the given table:\nWho wears number 21?\n"
        "Table information:\nCREATE TABLE data (`Player` TEXT, `No.` REAL, `Nationality` TEXT)\n"
        "Antonio Lang | 21 | United States\nCarlos Arroyo | 4 | Puerto Rico.",
        "SELECT `Player` FROM data WHERE `No.` = 21",
    ),
    "alpaca": (
        "alpaca_data_cleaned.json",
        json.dumps([{"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"}]),
        "Translate to French.\n\nHello",
        "Bonjour",
    ),
    "generic": ("mine.jsonl", json.dumps({"prompt": "Say hi.", "response": "Hi!"}), "Say hi.", "Hi!"),
}


@pytest.mark.parametrize("task", CASES)
def test_each_format_is_recognised_and_filled_into_the_appendix_c_template(tmp_path, task):
    name, text, query, response = CASES[task]
    if task == "wikisql":
        jsonl(tmp_path / "dev.tables.jsonl", TABLE)
    found, examples = load_task(write(tmp_path / name, text + "\n"))
    assert found == task
    assert [(ex.query, ex.response) for ex in examples] == [(query, response)]


def test_system_prompt_is_the_one_appendix_c_gives():
    assert SYSTEM_PROMPT == "You are a helpful, respectful and honest assistant."


def test_every_known_task_has_a_case_here():
    assert set(CASES) == set(TASK_FIELDS)


def test_references_hold_every_acceptable_answer(tmp_path):
    _, (squad,) = load_task(write(tmp_path / "s.json", CASES["squad"][1]))
    assert squad.references == ["France", "in France"]
    _, (gsm,) = load_task(write(tmp_path / "g.jsonl", CASES["gsm8k"][1]))
    assert gsm.references == ["5"]  # scored on the final answer, trained on the worked solution


def test_alpaca_without_input_is_the_instruction_alone(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([{"instruction": "Name a colour.", "input": "", "output": "Red."}]))
    _, (ex,) = load_task(path)
    assert (ex.query, ex.response) == ("Name a colour.", "Red.")


def test_the_most_specific_task_wins_detection():
    assert detect_task({"index": "0", "question": "q", "sentence": "s", "label": "entailment"}) == "qnli"
    assert detect_task({"index": "0", "sentence": "s"}) == "sst2"
    assert detect_task({"question": "q", "table_id": "t", "sql": {}}) == "wikisql"


@pytest.mark.parametrize(
    "parts, task, n",
    [
        (("boolq", "val.jsonl"), "boolq", 3270),
        (("boolq", "dev32.jsonl"), "boolq", 32),
        (("copa", "train_fewglue32.jsonl"), "copa", 32),
        (("sst2", "dev.tsv"), "sst2", 872),
        (("gsm8k", "test.jsonl"), "gsm8k", 1319),
        (("e2e", "devset.csv"), "e2e", 4672),
        (("e2e", "testset_w_refs.csv"), "e2e", 4693),
    ],
)
def test_real_task_files_are_recognised(parts, task, n):
    found, examples = load_task(shared("data", *parts))
    assert (found, len(examples)) == (task, n)
    assert all(ex.response and ex.response in ex.references for ex in examples if task != "gsm8k")


def test_real_boolq_and_copa_labels_become_appendix_c_label_names():
    path = shared("data", "boolq", "dev32.jsonl")
    labels = [json.loads(line)["label"] for line in path.read_text().splitlines()]
    _, examples = load_task(path)
    assert [ex.response for ex in examples] == ["yes" if label else "no" for label in labels]
    path = shared("data", "copa", "dev32.jsonl")
    labels = [json.loads(line)["label"] for line in path.read_text().splitlines()]
    _, examples = load_task(path)
    assert [ex.response for ex in examples] == [str(label + 1) for label in labels]


def test_e2e_is_scored_once_per_mr_against_all_its_refs():
    path = shared("data", "e2e", "devset.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    refs = {}
    for row in rows:
        refs.setdefault(row["mr"], []).append(row["ref"])
    _, examples = load_task(path)
    evaluation = one_per_query(examples)
    assert len(evaluation) == len(refs) == 547
    for ex in evaluation:
        assert ex.references == refs[ex.fields["ref"]]


def test_real_unlabeled_glue_test_split_needs_labels_false():
    path = shared("data", "sst2", "test.tsv")
    with pytest.raises(ValueError, match=r"test\.tsv:2: no label"):
        load_task(path)
    task, examples = load_task(path, labels=False)
    assert (task, len(examples), examples[0].response) == ("sst2", 1821, "")


def test_a_malformed_line_is_reported_as_file_and_line(tmp_path):
    path = write(tmp_path / "b.jsonl", CASES["boolq"][1] + "\n" + '{"question": "is it", "passage": \n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: not valid JSON"):
        load_task(path)
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\ngood .\t1\nbad .\t0\textra\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: expected 2 columns"):
        load_task(path)


def test_a_record_missing_a_field_is_reported_with_its_line(tmp_path):
    path = jsonl(tmp_path / "b.jsonl", json.loads(CASES["boolq"][1]), {"question": "q", "label": True})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: missing field 'passage'"):
        load_task(path)


def test_an_unknown_label_value_is_reported_with_its_line(tmp_path):
    path = jsonl(tmp_path / "r.jsonl", RTE, {**RTE, "label": "contradiction"})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: label 'contradiction'"):
        load_task(path)


def test_unknown_fields_list_every_known_task_and_the_generic_format(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", {"text": "hello", "target": "world"})
    with pytest.raises(ValueError) as error:
        load_task(path)
    message = str(error.value)
    assert message.startswith(f"{path}:1: no known task has the fields ['target', 'text']")
    for task in ["boolq", "copa", "rte", "record", "sst2", "qnli", "squad", "e2e", "gsm8k", "wikisql", "alpaca"]:
        assert f"  {task}: " in message
    assert '{"prompt": ..., "response": ...}' in message


def test_an_unknown_task_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="(?s)unknown task 'mnli'.*  boolq: "):
        load_task(write(tmp_path / "b.jsonl", CASES["boolq"][1]), task="mnli")


def test_an_explicit_task_overrides_detection(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", {"question": "q?", "passage": "p.", "label": False})
    with pytest.raises(ValueError, match="missing field 'premise' for a rte record"):
        load_task(path, task="rte")


@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.tsv", "sentence\tlabel\n")])
def test_an_empty_file_is_an_error(tmp_path, name, text):
    with pytest.raises(ValueError, match="no examples"):
        load_task(write(tmp_path / name, text))


def test_an_unlabeled_superglue_file_errors_unless_labels_are_not_needed(tmp_path):
    record = {"question": "is it", "passage": "It is.", "idx": 0}
    path = jsonl(tmp_path / "test.jsonl", record)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:1: no label"):
        load_task(path)
    _, (ex,) = load_task(path, labels=False)
    assert (ex.response, ex.references) == ("", [])


def test_a_gsm8k_answer_without_a_final_answer_line_is_an_error(tmp_path):
    path = jsonl(tmp_path / "g.jsonl", {"question": "1 + 1?", "answer": "It is 2."})
    with pytest.raises(ValueError, match=":1: answer has no '####"):
        load_task(path)


def test_wikisql_needs_its_tables_file_and_the_table(tmp_path):
    path = write(tmp_path / "dev.jsonl", CASES["wikisql"][1])
    with pytest.raises(FileNotFoundError, match="dev.tables.jsonl"):
        load_task(path)
    jsonl(tmp_path / "dev.tables.jsonl", {**TABLE, "id": "another"})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:1: table '1-10015132-11' is not in"):
        load_task(path)


def test_wikisql_target_sql_uses_the_official_operator_tables(tmp_path):
    question = {"question": "How many?", "table_id": TABLE["id"]}
    question["sql"] = {"sel": 1, "agg": 3, "conds": [[0, 0, "O'Neal"], [1, 1, 20.0], [1, 2, 30]]}
    jsonl(tmp_path / "t.tables.jsonl", TABLE)
    _, (ex,) = load_task(jsonl(tmp_path / "t.jsonl", question))
    assert ex.response == "SELECT COUNT(`No.`) FROM data WHERE `Player` = 'O''Neal' AND `No.` > 20 AND `No.` < 30"
    assert ex.table["rows"] == TABLE["rows"]


def examples_of(tmp_path, n, repeats=1):
    records = [{"mr": f"name[R{i}]", "ref": f"R{i} is good {j}."} for i in range(n) for j in range(repeats)]
    path = tmp_path / "e.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["mr", "ref"])
        writer.writeheader()
        writer.writerows(records)
    return load_task(path)[1]


def test_the_seeded_split_is_reproducible_disjoint_and_complete(tmp_path):
    examples = examples_of(tmp_path, 100)
    train, dev, test = split(examples, 0.1, 0.2, seed=1)
    assert (len(train), len(dev), len(test)) == (70, 10, 20)
    assert split(examples, 0.1, 0.2, seed=1) == (train, dev, test)
    assert split(examples, 0.1, 0.2, seed=2) != (train, dev, test)
    ids = [{ex.fields["ref"] for ex in part} for part in (train, dev, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 100


def test_the_split_keeps_every_row_of_a_prompt_in_one_part(tmp_path):
    examples = examples_of(tmp_path, 30, repeats=3)  # E2E-like: three refs per MR
    parts = split(examples, 0.2, 0.2, seed=0)
    assert sum(map(len, parts)) == 90
    for part in parts:
        mrs = [ex.fields["ref"] for ex in part]
        assert all(mrs.count(mr) == 3 for mr in mrs)
    assert not {ex.query for ex in parts[0]} & {ex.query for ex in parts[2]}


def test_the_split_keeps_every_question_on_one_passage_in_one_part(tmp_path):
    # BoolQ-like: 20 passages with 3 questions each; a passage in train and in test would leak its answers
    rows = [{"question": f"question {q} on passage {p}?", "passage": f"Passage number {p}.", "label": q % 2 == 0}
            for p in range(20) for q in range(3)]
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parts = split(load_task(path)[1], 0.2, 0.2, seed=0)
    passages = [{ex.fields[ex.trim] for ex in part} for part in parts]
    assert sum(map(len, parts)) == 60 and sum(map(len, passages)) == 20
    assert not (passages[0] & passages[1] or passages[0] & passages[2] or passages[1] & passages[2])


def test_a_split_that_cannot_be_made_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="must be >= 0 and sum below 1"):
        split(examples_of(tmp_path, 10), 0.5, 0.5, seed=0)
    with pytest.raises(ValueError, match="too few"):
        split(examples_of(tmp_path, 2), 0.1, 0.1, seed=0)


def words(query, response):  # a stand-in tokenizer: one token per whitespace-separated word
    return len(query.split()) + len(response.split())


def boolq_example(tmp_path, passage):
    path = jsonl(tmp_path / "b.jsonl", {"question": "is it long", "passage": passage, "label": True})
    return load_task(path)[1][0]


def test_truncation_cuts_only_the_passage_and_reports_it(tmp_path):
    passage = " ".join(f"w{i}" for i in range(100))
    ex = boolq_example(tmp_path, passage)
    assert words(ex.query, ex.response) == 107  # "Reference document:" 2 + 100 + "Question:" 1 + 3, "yes" 1
    short, cut = truncate(ex, words, 50)
    assert cut and words(short.query, short.response) == 50  # as much passage as fits
    assert short.query == "Reference document:\n" + " ".join(f"w{i}" for i in range(43)) + "\nQuestion:\nis it long"
    assert short.response == ex.response == "yes"
    assert ex.fields["doc"] == passage  # the original is left alone


def test_an_example_that_fits_is_not_truncated(tmp_path):
    ex = boolq_example(tmp_path, "short passage")
    assert truncate(ex, words, 9) == (ex, False)


def test_truncation_never_cuts_the_answer_of_a_reading_comprehension_example(tmp_path):
    context = "Paris is in France. " + " ".join(["filler"] * 50)
    _, (ex,) = load_task(write(tmp_path / "s.json", json.dumps(squad(context, "Where is Paris?", ["in France"]))))
    short, cut = truncate(ex, words, 20)
    assert cut and short.query.endswith("\nQuestion:\nWhere is Paris?") and short.response == "in France"
    assert short.query.startswith("Context:\nParis is in France. filler")


def test_a_table_loses_whole_rows_but_keeps_its_schema(tmp_path):
    table = {**TABLE, "rows": [[f"Player {i}", i, "Spain"] for i in range(10)]}
    jsonl(tmp_path / "dev.tables.jsonl", table)
    _, (ex,) = load_task(write(tmp_path / "dev.jsonl", CASES["wikisql"][1]))
    short, cut = truncate(ex, words, words(ex.query, ex.response) - 5)  # a row is 6 words: one must go
    rows = "\n".join(f"Player {i} | {i} | Spain" for i in range(9))
    assert cut and short.query.endswith("`Nationality` TEXT)\n" + rows + ".")
    schema_only = words(ex.query, ex.response) - 10 * 6
    short, cut = truncate(ex, words, schema_only)
    assert cut and short.query.endswith("`Nationality` TEXT).")
    with pytest.raises(ValueError, match="prompt longer than [0-9]+ tokens"):
        truncate(ex, words, schema_only - 1)  # the schema is never cut


def test_a_prompt_that_cannot_fit_even_without_its_passage_is_an_error(tmp_path):
    ex = boolq_example(tmp_path, "some passage")
    with pytest.raises(ValueError, match="prompt longer than [0-9]+ tokens"):
        truncate(ex, words, 6)  # 7 tokens without any passage
    _, (gsm,) = load_task(write(tmp_path / "g.jsonl", CASES["gsm8k"][1]))
    with pytest.raises(ValueError, match="prompt longer than [0-9]+ tokens"):
        truncate(gsm, words, 10)  # no passage to cut


@pytest.mark.parametrize(
    "task, text, label",
    [
        ("boolq", "Yes.", "yes"),
        ("boolq", " no, it is not", "no"),
        ("boolq", "nothing", None),
        ("rte", "Not entailment", "not entailment"),
        ("qnli", "entailment.", "entailment"),
        ("sst2", "Negative", "negative"),
        ("copa", "2", "2"),
        ("copa", "3", None),
        ("squad", "  in France \n", "in France"),
    ],
)
def test_generations_map_back_to_label_names(task, text, label):
    assert parse_prediction(task, text) == label
