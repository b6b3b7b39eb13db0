# The paper's metrics (Appendix B.7), each written after its official definition.
import re
import sqlite3
import string
import time
from collections import Counter

from .data import LABELS, TABLE_NAME, Example, parse_prediction, quote_name

# The figure each task reports in the paper's tables; score() returns it under this key, in percent.
METRIC = {
    "boolq": "acc",
    "copa": "acc",
    "sst2": "acc",
    "rte": "acc",
    "qnli": "acc",
    "record": "f1-em",
    "squad": "f1-em",
    "e2e": "rouge-l",
    "gsm8k": "acc",
    "wikisql": "acc",  # execution accuracy
    "alpaca": "rouge-l",  # the paper scores instruction tuning by ROUGE-L against reference answers (Table 3)
    "generic": "rouge-l",
}


def accuracy(predictions, golds) -> float:
    return sum(p == g for p, g in zip(predictions, golds, strict=True)) / len(golds)


# SQuAD v1.1 (evaluate-v1.1.py). ReCoRD's official script uses the same normalisation, F1 and EM.
def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in string.punctuation)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references: list[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(ref)) for ref in references)


def _f1(prediction, reference):
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:  # v1.1 also scores two empty answers 0 here
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, references: list[str]) -> float:
    return max(_f1(prediction, ref) for ref in references)


# ROUGE-L as the paper computes it, with Hugging Face Evaluate, which calls Google's rouge_score: default tokenizer
# (lowercase, anything but a-z 0-9 separates tokens), no stemming, F-measure of the longest common subsequence, and
# with several references (E2E) the best-scoring one (rouge_score's score_multi). The corpus figure is the mean.
def _rouge_tokens(text):
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a, b):
    prev = [0] * (len(b) + 1)  # prev[j]: LCS length of the part of a done so far and b[:j]
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l(prediction, reference):
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, references: list[str]) -> float:
    return max(_rouge_l(prediction, ref) for ref in references)


# GSM8K: a solution's final answer follows '####'; a generation without one is read by its last number.
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def gsm8k_answer(text: str) -> str | None:
    numbers = NUMBER.findall(text.rsplit("####", 1)[1])[:1] if "####" in text else NUMBER.findall(text)[-1:]
    return numbers[0].replace(",", "").replace("$", "") if numbers else None


def gsm8k_correct(prediction: str, reference: str) -> bool:
    pred, ref = gsm8k_answer(prediction), gsm8k_answer(reference)
    return pred is not None and ref is not None and float(pred) == float(ref)  # "18.00" is 18


# WikiSQL execution accuracy: a predicted query is right iff it runs and returns what the gold query returns.
SQL_TIMEOUT_S = 5.0
READ_ONLY = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}


def _database(table):
    # WikiSQL's own evaluation lowercases text on both sides, so text columns compare case-insensitively here.
    types = ["REAL" if t == "real" else "TEXT COLLATE NOCASE" for t in table["types"]]
    columns = ", ".join(f"{quote_name(h)} {t}" for h, t in zip(table["header"], types))
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE TABLE {TABLE_NAME} ({columns})")
    db.executemany(f"INSERT INTO {TABLE_NAME} VALUES ({', '.join('?' * len(types))})", table["rows"])
    # Generated SQL runs here: it may only read, and a runaway query (a huge self-join) is stopped.
    db.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in READ_ONLY else sqlite3.SQLITE_DENY)
    return db


def _run(db, sql):
    deadline = time.monotonic() + SQL_TIMEOUT_S
    db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    cursor = db.execute(sql)
    if cursor.description is None:  # "" or a non-query runs without error but returns nothing to compare
        raise sqlite3.ProgrammingError("not a query")
    return Counter(cursor.fetchall())  # WikiSQL queries have no ORDER BY, so rows compare as a multiset


def execution_match(prediction: str, gold: str, table: dict) -> bool:
    db = _database(table)
    try:
        try:
            expected = _run(db, gold)
        except sqlite3.Error as e:
            raise ValueError(f"gold SQL {gold!r} does not run: {e}") from None
        try:
            return _run(db, prediction) == expected
        except sqlite3.Error:
            return False
    finally:
        db.close()


def score(task: str, predictions: list[str], examples: list[Example]) -> dict:
    """The paper's metric for the task (plus its parts), in percent, from raw generations."""
    if task not in METRIC:
        raise ValueError(f"no metric for task {task!r}; known: {', '.join(METRIC)}")
    if len(predictions) != len(examples) or not examples:
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if any(not ex.references for ex in examples):
        raise ValueError("scoring needs labelled examples; these were loaded without labels")
    preds = [parse_prediction(task, p) for p in predictions]
    pairs = list(zip(preds, examples))
    if task in LABELS:
        return {"acc": 100 * accuracy(preds, [ex.response for ex in examples])}
    if task in ("squad", "record"):
        f = sum(f1(p, ex.references) for p, ex in pairs) / len(pairs)
        em = sum(exact_match(p, ex.references) for p, ex in pairs) / len(pairs)
        return {"f1-em": 100 * (f + em) / 2, "f1": 100 * f, "em": 100 * em}
    if task == "gsm8k":
        return {"acc": 100 * sum(gsm8k_correct(p, ex.references[0]) for p, ex in pairs) / len(pairs)}
    if task == "wikisql":
        return {"acc": 100 * sum(execution_match(p, ex.response, ex.table) for p, ex in pairs) / len(pairs)}
    return {"rouge-l": 100 * sum(rouge_l(p, ex.references) for p, ex in pairs) / len(pairs)}


# The label a generation starts with: what the lab's tables report, and what train.py --select-by label-acc keeps the
# best adapter by. score()'s parse wants the label as a whole word; a small model answers with the label but then runs
# on (the 260K model's EOS logit starts near -25 and the adapters never lift it in a few hundred steps), sometimes
# gluing a character to it ("positive8"), so this reads the label it chose.
def label_first(task: str, text: str) -> str | None:
    text = text.strip().lower()
    return next((name for name in LABELS[task] if text.startswith(name)), None)


def label_first_accuracy(task: str, predictions: list[str], golds: list[str]) -> float:
    """Percent of generations whose first label is the gold one (golds: the label names)."""
    if task not in LABELS:
        raise ValueError(f"{task} has no labels to read a generation's first label from")
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} labels")
    return 100 * accuracy([label_first(task, p) for p in predictions], golds)
