# Task files -> (query, response) pairs with the paper's prompt templates (Appendix C). The chat wrapping
# ([INST] <<SYS>> ... [/INST]) is the tokenizer's job; this module only fills the {query} slot and the response.
import csv
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

# Appendix C, the system prompt of the LLaMA-2 chat template that wraps every sample.
SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."

# Appendix C, "Template for prompt" of each task. Line breaks are the paper's; lines the two-column PDF merely wrapped
# are joined. Every task's "Template for response" is the bare target ([label_name], [answer] or [target]).
# The paper writes "sentence 2: [sentence1]", a typo for [sentence2], which is what we fill in.
NLI_PROMPT = (  # RTE and QNLI
    "sentence 1: {sentence1}\nsentence 2: {sentence2}\nAre sentence 1 and sentence 2 have entailment relation or not?"
)
SST2_PROMPT = "{sentence}\nThe sentiment of the given sentence is:"
BOOLQ_PROMPT = "Reference document:\n{doc}\nQuestion:\n{query}"
COPA_PROMPT = "Premise:\n{premise}\nChoice 1: {choice1}\nChoice 2: {choice2}\nQuestion:\n{query}"
QA_PROMPT = "Context:\n{context}\nQuestion:\n{query}"  # ReCoRD and SQuAD
E2E_PROMPT = "Reference:\n{ref}\nGenerate a customer review following the given reference."
# "quesition" is the paper's spelling; [ref] is its name for the math question.
GSM8K_PROMPT = "Answer the following math quesition:\n{ref}\nInstruction: please think step by step."
WIKISQL_PROMPT = (
    "Answer the following query by writing a SQL query on the given table:\n{query}\nTable information:\n{table_info}."
)
# Not in the paper, which gives no template for Alpaca or for free-form data: the instruction, then its input.
ALPACA_PROMPT = "{instruction}\n\n{input}"
PLAIN_PROMPT = "{prompt}"

# [label_name] of the classification tasks, as Appendix C names them; parse_prediction maps generations back to these.
LABELS = {
    "boolq": ("yes", "no"),
    "copa": ("1", "2"),
    "sst2": ("positive", "negative"),
    "rte": ("entailment", "not entailment"),
    "qnli": ("entailment", "not entailment"),
}
# Appendix C leaves COPA's [query] unnamed; the record only says "cause" or "effect", so we ask the question the way the
# original COPA release (Roemmele et al., 2011) does.
COPA_QUESTIONS = {"cause": "What was the CAUSE of this?", "effect": "What happened as a RESULT?"}

# The fields that identify each published format (labels excluded, so unlabeled test files are still recognised).
# A record belongs to the task whose identifying fields it has; the most specific match wins (QNLI over SST-2).
TASK_FIELDS = {
    "boolq": {"question", "passage"},  # SuperGLUE / FewGLUE jsonl
    "copa": {"premise", "choice1", "choice2", "question"},  # SuperGLUE jsonl
    "rte": {"premise", "hypothesis"},  # SuperGLUE jsonl
    "record": {"passage", "qas"},  # SuperGLUE jsonl
    "sst2": {"sentence"},  # GLUE tsv
    "qnli": {"question", "sentence"},  # GLUE tsv
    "squad": {"context", "question"},  # SQuAD v1.1 json, flattened to one record per question by _records
    "e2e": {"mr"},  # E2E csv
    "gsm8k": {"question", "answer"},  # GSM8K jsonl
    "wikisql": {"question", "table_id", "sql"},  # WikiSQL jsonl, tables in the matching .tables.jsonl
    "alpaca": {"instruction"},  # Alpaca json
    "generic": {"prompt"},  # jsonl of {"prompt", "response"}
}


@dataclass
class Example:
    template: str  # the Appendix C prompt template
    fields: dict  # the values of its slots
    response: str  # the training target ("" when the file has no labels)
    references: list = field(default_factory=list)  # every acceptable answer, for scoring
    trim: str | None = None  # the slot `truncate` may shorten: a passage, a context, a table's rows
    table: dict | None = None  # WikiSQL: the table the SQL runs on
    source: str = ""  # "file:line" it was read from, for error messages after shuffling and splitting

    @property
    def query(self) -> str:
        return self.template.format(**self.fields)


def _example(template, fields, references, response=None, **kw):
    if response is None:
        response = references[0] if references else ""
    return Example(template, fields, response, list(references), **kw)


def _label(record, key, names):
    if key not in record:
        return []  # unlabeled (a test split); load_task decides whether that is an error
    if record[key] not in names:
        raise ValueError(f"label {record[key]!r} is not one of {list(names)}")
    return [names[record[key]]]


def _boolq(r):
    yes_no = {True: "yes", False: "no", "true": "yes", "false": "no"}
    return _example(BOOLQ_PROMPT, {"doc": r["passage"], "query": r["question"]}, _label(r, "label", yes_no), trim="doc")


def _copa(r):
    if r["question"] not in COPA_QUESTIONS:
        raise ValueError(f"question {r['question']!r} is neither 'cause' nor 'effect'")
    fields = {"premise": r["premise"], "choice1": r["choice1"], "choice2": r["choice2"]}
    fields["query"] = COPA_QUESTIONS[r["question"]]
    return _example(COPA_PROMPT, fields, _label(r, "label", {0: "1", 1: "2"}))


NLI_NAMES = {"entailment": "entailment", "not_entailment": "not entailment"}


def _rte(r):
    fields = {"sentence1": r["premise"], "sentence2": r["hypothesis"]}
    return _example(NLI_PROMPT, fields, _label(r, "label", NLI_NAMES), trim="sentence1")


def _qnli(r):
    # GLUE QNLI: the question comes first, the sentence that may hold its answer second (and is the long one).
    fields = {"sentence1": r["question"].strip(), "sentence2": r["sentence"].strip()}
    return _example(NLI_PROMPT, fields, _label(r, "label", NLI_NAMES), trim="sentence2")


def _sst2(r):
    names = {"1": "positive", "0": "negative"}
    return _example(SST2_PROMPT, {"sentence": r["sentence"].strip()}, _label(r, "label", names))


def _squad(r):
    answers = r.get("answers") or []  # official: [{"text", "answer_start"}]; Hugging Face: {"text": [...], ...}
    texts = answers["text"] if isinstance(answers, dict) else [a["text"] for a in answers]
    fields = {"context": r["context"], "query": r["question"]}
    return _example(QA_PROMPT, fields, list(dict.fromkeys(texts)), trim="context")


def _record(r):  # one passage carries several cloze queries; each becomes an example
    return [
        _example(
            QA_PROMPT,
            {"context": r["passage"]["text"], "query": qa["query"]},  # the query keeps its @placeholder
            list(dict.fromkeys(a["text"] for a in qa.get("answers", []))),
            trim="context",
        )
        for qa in r["qas"]
    ]


def _e2e(r):  # references are filled in by load_task once every ref of the MR has been read
    return _example(E2E_PROMPT, {"ref": r["mr"]}, [r["ref"]] if r.get("ref") else [])


def _gsm8k(r):
    answer = r.get("answer")
    if answer is not None and "####" not in answer:
        raise ValueError("answer has no '#### <final answer>' line")
    # The model learns the whole worked solution; it is scored on the number after '####'.
    final = [answer.rsplit("####", 1)[1].strip()] if answer is not None else []
    return _example(GSM8K_PROMPT, {"ref": r["question"]}, final, response=answer or "")


def _alpaca(r):
    if r.get("input"):
        fields = {"instruction": r["instruction"], "input": r["input"]}
        return _example(ALPACA_PROMPT, fields, [r["output"]] if r.get("output") else [], trim="input")
    return _example(PLAIN_PROMPT, {"prompt": r["instruction"]}, [r["output"]] if r.get("output") else [])


def _generic(r):
    return _example(PLAIN_PROMPT, {"prompt": r["prompt"]}, [r["response"]] if r.get("response") else [])


# WikiSQL's operator tables (lib/query.py of the official release), indexed by the numbers in its "sql" field.
AGG_OPS = ["", "MAX", "MIN", "COUNT", "SUM", "AVG"]
COND_OPS = ["=", ">", "<", "OP"]
TABLE_NAME = "data"  # WikiSQL calls every table "table", an SQL keyword; ours must run in sqlite as written


def quote_name(name):
    # Backticks, not double quotes: sqlite reads a double-quoted name that is no column as a string literal.
    return "`" + str(name).replace("`", "``") + "`"


def _value(v):
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _literal(v):
    return _value(v) if isinstance(v, (int, float)) else "'" + str(v).replace("'", "''") + "'"


def wikisql_sql(sql: dict, header: list) -> str:
    col = quote_name(header[sql["sel"]])
    agg = AGG_OPS[sql["agg"]]
    out = f"SELECT {agg}({col}) FROM {TABLE_NAME}" if agg else f"SELECT {col} FROM {TABLE_NAME}"
    conds = [f"{quote_name(header[c])} {COND_OPS[op]} {_literal(v)}" for c, op, v in sql["conds"]]
    return out + " WHERE " + " AND ".join(conds) if conds else out


def table_info(table: dict) -> str:
    # The schema as the SQL will see it, then one line per row: truncation drops rows from the end, never the schema.
    types = ["REAL" if t == "real" else "TEXT" for t in table["types"]]
    columns = ", ".join(f"{quote_name(h)} {t}" for h, t in zip(table["header"], types))
    rows = [" | ".join(_value(v) for v in row) for row in table["rows"]]
    return "\n".join([f"CREATE TABLE {TABLE_NAME} ({columns})"] + rows)


def _wikisql(r, tables):
    if r["table_id"] not in tables:
        raise ValueError(f"table {r['table_id']!r} is not in the tables file")
    table = tables[r["table_id"]]
    fields = {"query": r["question"].strip(), "table_info": table_info(table)}
    target = [wikisql_sql(r["sql"], table["header"])] if r.get("sql") else []
    return _example(WIKISQL_PROMPT, fields, target, trim="table_info", table=table)


def _wikisql_tables(path):
    # WikiSQL ships each split's questions with its tables beside them: dev.jsonl with dev.tables.jsonl.
    tables_path = path.with_name(path.name.removesuffix(".jsonl") + ".tables.jsonl")
    if not tables_path.is_file():
        raise FileNotFoundError(f"{path}: WikiSQL questions need their tables, expected in {tables_path}")
    tables = {}
    for loc, t in _records(tables_path):
        if not {"id", "header", "types", "rows"} <= t.keys():
            raise ValueError(f"{loc}: a WikiSQL table needs the fields id, header, types and rows")
        tables[t["id"]] = t
    return tables


CONVERTERS = {
    "boolq": _boolq,
    "copa": _copa,
    "rte": _rte,
    "record": _record,
    "sst2": _sst2,
    "qnli": _qnli,
    "squad": _squad,
    "e2e": _e2e,
    "gsm8k": _gsm8k,
    "wikisql": _wikisql,  # also takes the tables, read once by load_task
    "alpaca": _alpaca,
    "generic": _generic,
}


def _records(path):
    """Yields ("file:line", record) for every record of a .jsonl, .json, .tsv or .csv file."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object, found {type(record).__name__}")
                yield f"{path}:{n}", record
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        if isinstance(data, dict) and "data" in data:  # SQuAD: data[].paragraphs[].qas[], one record per question
            try:
                for article in data["data"]:
                    for paragraph in article["paragraphs"]:
                        for qa in paragraph["qas"]:
                            yield f"{path}: question {qa.get('id')}", {"context": paragraph["context"], **qa}
            except (KeyError, TypeError) as e:
                raise ValueError(f"{path}: not SQuAD's layout data[].paragraphs[].context/qas[] ({e!r})") from None
        elif isinstance(data, list):  # Alpaca: a list of records
            for i, record in enumerate(data):
                if not isinstance(record, dict):
                    raise ValueError(f"{path}: record {i}: expected a JSON object, found {type(record).__name__}")
                yield f"{path}: record {i}", record
        else:
            raise ValueError(f'{path}: expected a JSON list of records or SQuAD\'s {{"data": [...]}}')
    elif path.suffix in (".tsv", ".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            # GLUE's tsv files are unquoted: a '"' in a sentence is text.
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if path.suffix == ".tsv" else csv.reader(f)
            header = next(rows, [])
            for row in rows:
                if not row:
                    continue
                if len(row) != len(header):
                    columns = f"{len(header)} columns ({', '.join(header)})"
                    raise ValueError(f"{path}:{rows.line_num}: expected {columns}, found {len(row)}")
                yield f"{path}:{rows.line_num}", dict(zip(header, row))
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl, .json, .tsv or .csv")


def _known_formats():
    lines = [f"  {task}: {', '.join(sorted(fields))}" for task, fields in TASK_FIELDS.items()]
    return "known tasks and the fields that identify them:\n" + "\n".join(lines)


def detect_task(record: dict) -> str:
    matches = [task for task, fields in TASK_FIELDS.items() if fields <= record.keys()]
    if not matches:
        raise ValueError(
            f"no known task has the fields {sorted(record)}; {_known_formats()}\n"
            'for any other data, write a jsonl of {"prompt": ..., "response": ...} records'
        )
    return max(matches, key=lambda task: len(TASK_FIELDS[task]))


def load_task(path: str | Path, task: str | None = None, labels: bool = True) -> tuple[str, list[Example]]:
    """Reads a task file; an example without its label is an error, unless labels=False: then an unlabeled file (a
    GLUE test.tsv) loads with empty responses, to generate only."""
    path = Path(path)
    if task is not None and task not in CONVERTERS:
        raise ValueError(f"unknown task {task!r}; {_known_formats()}")
    tables = None
    examples = []
    for loc, record in _records(path):
        if task is None:
            try:
                task = detect_task(record)
            except ValueError as e:
                raise ValueError(f"{loc}: {e}") from None
        if task == "wikisql" and tables is None:
            tables = _wikisql_tables(path)
        try:
            made = CONVERTERS[task](record, tables) if task == "wikisql" else CONVERTERS[task](record)
        except KeyError as e:
            raise ValueError(f"{loc}: missing field {e} for a {task} record") from None
        except (ValueError, TypeError, IndexError) as e:
            raise ValueError(f"{loc}: {e}") from None
        for ex in made if isinstance(made, list) else [made]:
            if labels and not ex.references:
                raise ValueError(  # no word of labels=False: on train.py's command line it means nothing
                    f"{loc}: no label or answer (an unlabeled test split?); training and scoring need labelled "
                    "examples"
                )
            ex.source = loc
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: no examples (empty file)")
    if task == "e2e":  # every ref of an MR is a reference for it; training keeps one example per (MR, ref)
        refs = defaultdict(list)
        for ex in examples:
            refs[ex.fields["ref"]] += ex.references
        for ex in examples:
            ex.references = refs[ex.fields["ref"]]
    return task, examples


def one_per_query(examples: list[Example]) -> list[Example]:
    """Evaluation examples: E2E has one row per (MR, ref) but is scored once per MR, against all its refs."""
    first = {}
    for ex in examples:
        first.setdefault(ex.query, ex)
    return list(first.values())


def split(examples: list[Example], dev_fraction: float, test_fraction: float, seed: int = 0):
    """A seeded train/dev/test split of one file. Examples sharing a passage (ReCoRD's cloze queries, SQuAD's and
    BoolQ's questions on one text) or a query (E2E's refs of one MR) stay together, so no answer leaks across parts."""
    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction >= 1:
        raise ValueError(f"dev_fraction {dev_fraction} and test_fraction {test_fraction} must be >= 0 and sum below 1")
    groups = defaultdict(list)
    for ex in examples:
        groups[ex.fields[ex.trim] if ex.trim else ex.query].append(ex)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n_dev = max(1, round(dev_fraction * len(keys))) if dev_fraction else 0
    n_test = max(1, round(test_fraction * len(keys))) if test_fraction else 0
    if n_dev + n_test >= len(keys):
        raise ValueError(f"{len(keys)} distinct prompts (or passages) are too few for a train/dev/test split")
    parts = keys[n_dev + n_test :], keys[:n_dev], keys[n_dev : n_dev + n_test]
    return tuple([ex for key in part for ex in groups[key]] for part in parts)


def truncate(example: Example, count, max_len: int) -> tuple[Example, bool]:
    """Shortens the example's passage until count(query, response) <= max_len; returns it and whether it was cut.

    `count` returns the number of tokens of a (query, response) pair as the model sees it, chat template included.
    The question and the response are never cut. Prose loses words from its end, a WikiSQL table loses rows.
    """
    if count(example.query, example.response) <= max_len:
        return example, False
    if example.trim is None:
        raise ValueError(f"prompt longer than {max_len} tokens; this task has no passage to cut")
    sep = "\n" if example.trim == "table_info" else " "
    units = example.fields[example.trim].split(sep)
    keep = 1 if sep == "\n" else 0  # a table keeps its schema line

    def cut(n):
        return replace(example, fields={**example.fields, example.trim: sep.join(units[:n])})

    def fits(n):
        short = cut(n)
        return count(short.query, short.response) <= max_len

    if not fits(keep):
        raise ValueError(
            f"prompt longer than {max_len} tokens even with its {example.trim} removed"
        )
    lo, hi = keep, len(units)  # cut(lo) fits, cut(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return cut(lo), True


def parse_prediction(task: str, text: str) -> str | None:
    """A generation as the metric reads it: a label name (None if it names none) or the stripped answer text."""
    if task not in LABELS:
        return text.strip()  # free text; GSM8K's final number is extracted by metrics.gsm8k_answer
    words = " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())
    for name in LABELS[task]:  # whole words only: "no" must not match "not entailment" or "nothing"
        if words == name or words.startswith(name + " "):
            return name
    return None
