"""`mobilevlm eval`: the question file is validated line by line, and the metrics are exact-match and POPE's."""

import json

import pytest
import torch

from mobilevlm_ros.cli import main
from mobilevlm_ros.demo.world import write_eval_set
from mobilevlm_ros.evaluate import EvalDataError, Question, is_correct, normalize_answer, read_questions, score


def test_bad_lines_are_named_by_number(tmp_path):
    path = tmp_path / "q.jsonl"
    good = json.dumps({"image": "a.png", "question": "What colour?", "answer": "red"})
    for text, problem in [
        (good + "\n{not json", ":2: not JSON"),
        (good + "\n[1, 2]", ":2: expected a JSON object"),
        (json.dumps({"image": "a.png", "question": " ", "answer": "red"}), ":1: field 'question' must be a non-empty string"),
        (json.dumps({"image": "a.png", "question": "q"}), ":1: field 'answer' must be a non-empty string"),
        ("\n\n", "holds no questions"),
    ]:
        path.write_text(text)
        with pytest.raises(EvalDataError, match=problem):
            read_questions(path)
    with pytest.raises(EvalDataError, match="cannot read"):
        read_questions(tmp_path / "missing.jsonl")


def test_answers_match_after_normalization():
    assert normalize_answer("  Red. ") == "red" == normalize_answer("RED")
    assert normalize_answer("turn_left") == "turn_left"
    assert normalize_answer("a  blue\nsquare!") == "a blue square"
    assert is_correct(" Turn_left.", "turn_left") and not is_correct("left", "turn_left")


def test_accuracy_per_kind_and_pope_metrics():
    questions = [Question("i", "q", answer, kind) for answer, kind in [
        ("red", "colour"), ("blue", "colour"), ("yes", "existence"), ("yes", "existence"), ("no", "existence"), ("no", "existence"),
    ]]
    predictions = ["Red.", "green", "Yes", "no", "yes, there is", "No."]
    report = score(questions, predictions)
    assert report["accuracy"] == pytest.approx(3 / 6)
    assert report["by_kind"] == {"colour": {"questions": 2, "accuracy": 0.5}, "existence": {"questions": 4, "accuracy": 0.5}}
    yes_no = report["yes_no"]
    # said yes to 2 (one right), 2 true positives exist: precision 1/2, recall 1/2; 2 of 4 right
    assert (yes_no["precision"], yes_no["recall"], yes_no["f1"], yes_no["accuracy"], yes_no["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)


def test_the_eval_command_answers_every_question_and_writes_the_report(make_checkpoint, tmp_path, capsys):
    data = write_eval_set(tmp_path / "set", seed=9, count_per_kind=2, kinds=("colour", "existence"))
    checkpoint = make_checkpoint(dtype=torch.float32)
    out = tmp_path / "report.json"
    code = main(["eval", "--model", str(checkpoint), "--device", "cpu", "--data", str(data), "--images",
                 str(tmp_path / "set" / "images"), "--max-new-tokens", "3", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| colour | 2 |" in table and "| existence | 2 |" in table and "yes/no questions" in table
    written = json.loads(out.read_text())
    assert written["report"]["questions"] == 4 and len(written["answers"]) == 4
    assert all(isinstance(row["prediction"], str) for row in written["answers"])


def test_the_eval_command_reports_a_missing_image(make_checkpoint, tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"image": "nowhere.png", "question": "What colour?", "answer": "red"}) + "\n")
    code = main(["eval", "--model", str(make_checkpoint(dtype=torch.float32)), "--device", "cpu", "--data", str(data),
                 "--images", str(tmp_path)])
    assert code == 1
    assert "nowhere.png: cannot read image" in capsys.readouterr().err
