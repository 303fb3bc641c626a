"""`mobilevlm eval`: how often a model's answers match a question/answer file, with POPE's yes/no metrics.

The file is JSON lines, one question each: {"image": "<file under --images>", "question": "...", "answer": "...",
"kind": "<optional group name>"}. Answers are compared after normalization (case, surrounding space and punctuation).
Yes/no questions (reference answer yes or no) also get precision, recall and F1 with "yes" as the positive class, and
the share of "yes" answers, as the POPE benchmark reports them.
"""

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mobilevlm_ros.errors import MobileVLMError
from mobilevlm_ros.model.preprocess import load_image_file
from mobilevlm_ros.runtime.vlm import MobileVLM

logger = logging.getLogger(__name__)


class EvalDataError(MobileVLMError):
    """A question file that cannot be read as the format above."""


@dataclass(frozen=True)
class Question:
    image: str
    question: str
    answer: str
    kind: str = "all"


def read_questions(path: str | Path) -> list[Question]:
    """Every line of a JSON-lines question file; a bad line is an error naming its number and what is wrong."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise EvalDataError(f"{path}: cannot read ({error})") from error
    questions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except ValueError as error:
            raise EvalDataError(f"{path}:{number}: not JSON ({error})") from error
        if not isinstance(fields, dict):
            raise EvalDataError(f"{path}:{number}: expected a JSON object")
        for name in ("image", "question", "answer"):
            if not isinstance(fields.get(name), str) or not fields[name].strip():
                raise EvalDataError(f"{path}:{number}: field {name!r} must be a non-empty string")
        questions.append(Question(fields["image"], fields["question"], fields["answer"], str(fields.get("kind", "all"))))
    if not questions:
        raise EvalDataError(f"{path}: holds no questions")
    return questions


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: "Red." and "red" match."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after normalization: how every answer is scored (eval, the demo, the demo model's tests)."""
    return normalize_answer(prediction) == normalize_answer(answer)


def score(questions: list[Question], predictions: list[str]) -> dict:
    """Exact-match accuracy overall and per kind; POPE's metrics over the yes/no questions."""
    correct = [is_correct(p, q.answer) for q, p in zip(questions, predictions, strict=True)]
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for question, hit in zip(questions, correct, strict=True):
        by_kind[question.kind].append(hit)
    report = {
        "questions": len(questions),
        "accuracy": sum(correct) / len(correct),
        "by_kind": {kind: {"questions": len(hits), "accuracy": sum(hits) / len(hits)} for kind, hits in sorted(by_kind.items())},
    }
    yes_no = [(normalize_answer(q.answer) == "yes", normalize_answer(p).startswith("yes"))
              for q, p in zip(questions, predictions, strict=True) if normalize_answer(q.answer) in ("yes", "no")]
    if yes_no:
        true_positive = sum(truth and said for truth, said in yes_no)
        said_yes = sum(said for _, said in yes_no)
        positives = sum(truth for truth, _ in yes_no)
        precision = true_positive / said_yes if said_yes else 0.0
        recall = true_positive / positives if positives else 0.0
        report["yes_no"] = {
            "questions": len(yes_no),
            "accuracy": sum(truth == said for truth, said in yes_no) / len(yes_no),
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": said_yes / len(yes_no),
        }
    return report


def evaluate(vlm: MobileVLM, questions: list[Question], images_dir: str | Path, max_new_tokens: int = 16,
             progress: bool = True) -> tuple[dict, list[str]]:
    """Answer every question (greedy) and score the answers; returns the report and the answers."""
    images_dir = Path(images_dir)
    predictions = []
    started = time.perf_counter()
    for question in tqdm(questions, desc="eval", unit="q", disable=not progress):
        image = load_image_file(images_dir / question.image)
        predictions.append(vlm.ask(image, question.question, max_new_tokens=max_new_tokens))
    report = score(questions, predictions)
    report["seconds_per_question"] = (time.perf_counter() - started) / len(questions)
    return report, predictions

