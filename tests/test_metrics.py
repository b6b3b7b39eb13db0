import pytest

from para_mini import metrics
from para_mini.data import TASK_FIELDS, Example, wikisql_sql
from para_mini.metrics import (
    METRIC,
    accuracy,
    exact_match,
    execution_match,
    f1,
    gsm8k_answer,
    gsm8k_correct,
    normalize_answer,
    rouge_l,
    score,
)


def test_accuracy_counts_exact_matches():
    assert accuracy(["yes", "no", None, "no"], ["yes", "yes", "no", "no"]) == 0.5


@pytest.mark.parametrize(
    "text, normal",
    [
        ("The  Cat, sat!", "cat sat"),  # case, punctuation, articles, whitespace
        ("An apple a day", "apple day"),
        ("U.S.A.", "usa"),  # punctuation is deleted, not turned into spaces
        ("the theater", "theater"),  # articles only as whole words
    ],
)
def test_squad_normalisation_is_the_official_one(text, normal):
    assert normalize_answer(text) == normal


def test_squad_exact_match_after_normalisation_best_reference():
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower", "tower"]) == 0.0
    assert exact_match("tower", ["Eiffel Tower", "The tower"]) == 1.0


def test_squad_f1_on_hand_worked_cases():
    # [big, red, dog] vs [red, dog, barked]: 2 common, P = R = 2/3
    assert f1("the big red dog", ["a red dog barked"]) == pytest.approx(2 / 3)
    # best reference: [red, dog] vs [red, dog, house] gives P = 1, R = 2/3, F1 = 0.8
    assert f1("red dog", ["cat", "red dog house"]) == pytest.approx(0.8)
    # token counts are clipped: one "dog" in common, P = 1/3, R = 1
    assert f1("dog dog dog", ["Dog."]) == pytest.approx(0.5)
    assert f1("Paris", ["France"]) == 0.0


def test_squad_v1_scores_answers_that_normalise_to_nothing_as_the_official_script_does():
    assert exact_match("", ["the"]) == 1.0
    assert f1("", ["the"]) == 0.0


def test_rouge_l_on_hand_worked_cases():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # case and punctuation are separators: [blue spice is a coffee shop] vs [blue spice a coffee shop], P 5/6, R 1
    assert rouge_l("Blue Spice is a coffee shop.", ["blue spice, a coffee-shop"]) == pytest.approx(10 / 11)
    # a subsequence, not a substring
    assert rouge_l("a b c d", ["a c b d"]) == pytest.approx(0.75)
    assert rouge_l("d c b a", ["a b c d"]) == pytest.approx(0.25)
    assert rouge_l("", ["a"]) == rouge_l("!!!", ["a"]) == 0.0


def test_rouge_l_takes_the_best_reference():
    # [a b c] vs [a c]: LCS 2, P 2/3, R 1
    assert rouge_l("a b c", ["x y", "a c"]) == pytest.approx(0.8)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("#### 18 dollars, not 20", "18"),
        ("#### -5", "-5"),
        ("48/2 = 24 clips, and 48 + 24 = 72", "72"),  # no '####': the last number
        ("The answer is $1,000.50.", "1000.50"),
        ("I cannot tell.", None),
    ],
)
def test_gsm8k_final_answer_extraction(text, answer):
    assert gsm8k_answer(text) == answer


def test_gsm8k_answers_compare_as_numbers():
    assert gsm8k_correct("So the total is 18.00", "#### 18")
    assert not gsm8k_correct("#### 17", "#### 18")
    assert not gsm8k_correct("no idea", "#### 18")


TABLE = {
    "header": ["Player", "No.", "Nationality"],
    "types": ["text", "real", "text"],
    "rows": [
        ["Antonio Lang", 21, "United States"],
        ["Voshon Lenard", 2, "United States"],
        ["Martin Lewis", 32, "United States"],
        ["Carlos Arroyo", 4, "Puerto Rico"],
    ],
}
GOLD = wikisql_sql({"sel": 0, "agg": 0, "conds": [[1, 0, 21]]}, TABLE["header"])


def test_wikisql_gold_sql_runs_and_the_same_query_matches():
    assert GOLD == "SELECT `Player` FROM data WHERE `No.` = 21"
    assert execution_match(GOLD, GOLD, TABLE)


@pytest.mark.parametrize(
    "prediction",
    [
        'select "Player" from data where "No." > 20 and "No." < 30',  # different query, same result
        "SELECT Player FROM data WHERE \"No.\" = '21';",
        'SELECT "Player" FROM data WHERE "Nationality" = \'united states\' AND "No." = 21.0',
    ],
)
def test_wikisql_an_equivalent_query_counts_as_correct(prediction):
    assert execution_match(prediction, GOLD, TABLE)


@pytest.mark.parametrize(
    "prediction",
    [
        'SELECT "Player" FROM data WHERE "No." = 2',  # runs, wrong rows
        'SELECT "Nationality" FROM data WHERE "No." = 21',  # runs, wrong column
        "SELECT `Team` FROM data WHERE `No.` = 21",  # no such column
        'SELECT "Team" FROM data WHERE "No." = 21',  # sqlite reads "Team" as the string 'Team'
        "The player is Antonio Lang.",  # not SQL
        "",  # runs, returns nothing: still not an answer
        'SELECT "Player" FROM data WHERE "No." = 21; SELECT 1',  # two statements
        "DELETE FROM data",
    ],
)
def test_wikisql_a_wrong_or_failing_query_counts_as_wrong(prediction):
    assert not execution_match(prediction, GOLD, TABLE)


def test_wikisql_a_non_query_never_matches_an_empty_gold_result():
    nobody = "SELECT `Player` FROM data WHERE `No.` = 99"
    assert execution_match("SELECT `Player` FROM data WHERE `No.` > 50", nobody, TABLE)
    assert not execution_match("", nobody, TABLE)
    assert not execution_match("-- no rows", nobody, TABLE)


def test_wikisql_text_compares_case_insensitively_and_rows_as_a_multiset():
    gold = wikisql_sql({"sel": 0, "agg": 3, "conds": [[2, 0, "UNITED STATES"]]}, TABLE["header"])
    assert gold == "SELECT COUNT(`Player`) FROM data WHERE `Nationality` = 'UNITED STATES'"
    assert execution_match("SELECT COUNT(*) FROM data WHERE \"Nationality\" = 'United States'", gold, TABLE)
    players = "SELECT \"Player\" FROM data WHERE \"Nationality\" = 'United States'"
    assert execution_match(players + ' ORDER BY "No."', players, TABLE)  # order does not matter
    assert not execution_match('SELECT "Nationality" FROM data', 'SELECT DISTINCT "Nationality" FROM data', TABLE)


def test_wikisql_a_runaway_query_is_stopped_and_counts_as_wrong(monkeypatch):
    monkeypatch.setattr(metrics, "SQL_TIMEOUT_S", 0.2)
    huge = "SELECT COUNT(*) FROM " + ", ".join(f"data t{i}" for i in range(20))  # 4^20 rows
    assert not execution_match(huge, GOLD, TABLE)


def test_wikisql_gold_sql_that_does_not_run_is_an_error():
    with pytest.raises(ValueError, match="gold SQL"):
        execution_match(GOLD, "SELECT `Team` FROM data", TABLE)


def example(response, references=None, table=None):
    return Example("{q}", {"q": "?"}, response, references or [response], table=table)


def test_score_reports_each_tasks_paper_metric_in_percent():
    labels = [example("yes"), example("no"), example("no")]
    assert score("boolq", ["Yes.", "nope", "no"], labels) == {"acc": pytest.approx(200 / 3)}
    qa = [example("Eiffel Tower"), example("France")]
    # EM 1, 0; F1 1, 2/3 ([paris, france] vs [france])
    assert score("squad", ["the Eiffel Tower", "Paris France"], qa) == pytest.approx(
        {"f1": 250 / 3, "em": 50.0, "f1-em": (250 / 3 + 50) / 2}
    )
    e2e = [example("the cat is on the mat", ["the cat is on the mat", "a dog"])]
    assert score("e2e", ["the cat sat on the mat"], e2e) == {"rouge-l": pytest.approx(500 / 6)}
    gsm = [example("2 + 16 = 18\n#### 18", ["18"])] * 2
    assert score("gsm8k", ["so #### 18", "I think 17"], gsm) == {"acc": 50.0}
    sql = [example(GOLD, table=TABLE)] * 2
    assert score("wikisql", [GOLD, 'SELECT "Player" FROM data'], sql) == {"acc": 50.0}


def test_every_task_has_a_metric():
    assert set(METRIC) == set(TASK_FIELDS)


def test_score_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        score("boolq", ["yes", "no"], [example("yes")])
    with pytest.raises(ValueError, match="labelled"):
        score("boolq", ["yes"], [Example("{q}", {"q": "?"}, "", [])])
    with pytest.raises(ValueError, match="no metric for task 'mnli'"):
        score("mnli", ["yes"], [example("yes")])
