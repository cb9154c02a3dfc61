"""The sample models (`hybridroute models sample`): trained on the spot, no downloads.

- `iris` v1: a random forest on scikit-learn's bundled iris data (numeric input);
- `ticket-triage` v1: TF-IDF + logistic regression over synthetic support tickets
  (BYTES input), some of which carry fake personal data (emails, phone numbers), the
  kind of payload the router must keep on-prem.

Everything is seeded, so two runs write the same models. Both go through
`package_model`, the same path an ML engineer's model takes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from hybridroute.node.modelconfig import Batching
from hybridroute.node.packaging import VersionExistsError, package_model

__all__ = ["SAMPLE_MODELS", "TICKET_LABELS", "SampleModel", "generate_tickets", "write_samples"]

SAMPLE_MODELS: tuple[str, ...] = ("iris", "ticket-triage")
TICKET_LABELS: tuple[str, ...] = ("account", "billing", "shipping", "technical")
IRIS_FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
SEED = 0


@dataclass(frozen=True)
class SampleModel:
    """What `write_samples` wrote: model, version, directory and held-out accuracy."""

    name: str
    version: int
    path: Path
    accuracy: float


_TEMPLATES: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged twice for my {plan} subscription this month",
        "Please refund the {amount} charge on invoice {invoice}",
        "My credit card was billed {amount} but I cancelled last week",
        "Can you send me a copy of invoice {invoice} for my records",
        "Why did the price of the {plan} plan go up on my last bill",
        "The payment failed and now my invoice shows a late fee",
        "I need a VAT receipt for the {amount} payment",
        "Update the billing address on my invoices please",
    ),
    "technical": (
        "The app crashes every time I open the {feature} page",
        "I get error {code} when I try to upload a file",
        "Sync stopped working after the latest update on {device}",
        "The {feature} screen is very slow and times out",
        "Notifications are not arriving on my {device}",
        "The export to CSV produces an empty file",
        "Login works but the dashboard shows error {code}",
        "The {device} app freezes when I switch to dark mode",
    ),
    "account": (
        "I cannot log in, the password reset email never arrives",
        "Please delete my account and all my data",
        "How do I change the email address on my profile",
        "My account was locked after too many login attempts",
        "I want to add a second user to my team account",
        "Two factor authentication codes are rejected on my profile",
        "Please merge my two accounts into one",
        "I forgot my username, can you help me recover my account",
    ),
    "shipping": (
        "My order {order} has not arrived yet",
        "The parcel for order {order} was delivered to the wrong address",
        "Tracking for order {order} has not updated in five days",
        "The package arrived damaged, the box was crushed",
        "Can I change the delivery address for order {order}",
        "When will order {order} ship, it says processing since Monday",
        "The courier left my package outside in the rain",
        "I received only two of the three items in order {order}",
    ),
}
# Tickets that could be any topic: real queues are noisy, and a perfect held-out score
# would hide that the model can be wrong.
_AMBIGUOUS = (
    "I need help with my account and my last order",
    "Nothing works since yesterday, please call me back",
    "I was charged for order {order} but the app shows an error",
    "Please escalate this, I have been waiting for a week",
)
_OPENERS = ("", "Hi, ", "Hello team, ", "Good morning. ", "Urgent: ", "Hey, ")
_CLOSERS = ("", " Thanks.", " Please help.", " This is the second time I ask.", " Regards.")
_FIRST = ("Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas")
_LAST = ("Meyer", "Okafor", "Rossi", "Nguyen", "Schmidt", "Dubois", "Kowalski", "Silva")


def _slots(rng: random.Random) -> dict[str, str]:
    return {
        "plan": rng.choice(("Basic", "Pro", "Team", "Enterprise")),
        "amount": f"{rng.choice(('EUR', 'USD'))} {rng.randint(5, 400)}.{rng.randrange(100):02d}",
        "invoice": f"INV-{rng.randint(10000, 99999)}",
        "feature": rng.choice(("reports", "settings", "calendar", "search", "billing")),
        "code": str(rng.choice((500, 502, 403, 404, 1012, 77))),
        "device": rng.choice(("iPhone", "Android phone", "Windows laptop", "iPad", "Mac")),
        "order": f"#{rng.randint(100000, 999999)}",
    }


def _contact(rng: random.Random) -> str:
    """Fake personal data, as real tickets carry it (never a real person)."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    choice = rng.randrange(4)
    if choice == 0:
        return f" You can reach me at {first.lower()}.{last.lower()}@example.com."
    if choice == 1:
        return f" Call me on +49 151 {rng.randint(1000000, 9999999)}."
    if choice == 2:
        return f" {first} {last}"
    return ""


def generate_tickets(n: int = 400, seed: int = SEED) -> tuple[list[str], list[str]]:
    """`n` synthetic support tickets and their labels, balanced across TICKET_LABELS."""
    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[str] = []
    for i in range(n):
        label = TICKET_LABELS[i % len(TICKET_LABELS)]
        pool = _AMBIGUOUS if rng.random() < 0.1 else _TEMPLATES[label]
        body = rng.choice(pool).format(**_slots(rng))
        text = rng.choice(_OPENERS) + body + "." + rng.choice(_CLOSERS) + _contact(rng)
        texts.append(text)
        labels.append(label)
    return texts, labels


def _existing(out: Path) -> list[Path]:
    return [out / name / "1" for name in SAMPLE_MODELS if (out / name / "1").exists()]


def _write_iris(out: Path, force: bool) -> SampleModel:
    x, y = load_iris(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=SEED, stratify=y
    )
    model = RandomForestClassifier(n_estimators=50, random_state=SEED).fit(x_train, y_train)
    path = package_model(
        model,
        name="iris",
        version=1,
        repo=out,
        input_name="input",
        input_datatype="FP64",
        features=IRIS_FEATURES,
        baseline_sample=x_train,
        batching=Batching(max_batch_size=32),
        description="Iris species (0 setosa, 1 versicolor, 2 virginica) from flower measurements",
        force=force,
    )
    return SampleModel("iris", 1, path, float(model.score(x_test, y_test)))


def _ticket_pipeline() -> Any:
    return Pipeline(
        [
            ("tfidf", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)),
            ("clf", LogisticRegression(max_iter=1000, random_state=SEED)),
        ]
    )


def _write_tickets(out: Path, force: bool) -> SampleModel:
    texts, labels = generate_tickets()
    t_train, t_test, l_train, l_test = train_test_split(
        texts, labels, test_size=0.25, random_state=SEED, stratify=labels
    )
    model = _ticket_pipeline().fit(t_train, l_train)
    path = package_model(
        model,
        name="ticket-triage",
        version=1,
        repo=out,
        input_name="text",
        input_datatype="BYTES",
        baseline_sample=t_train,
        batching=Batching(max_batch_size=64),
        description="Support ticket topic (account, billing, shipping, technical) from its text",
        force=force,
    )
    return SampleModel("ticket-triage", 1, path, float(model.score(t_test, l_test)))


def write_samples(out: Path, *, force: bool = False) -> list[SampleModel]:
    """Train and package both sample models under `out` (a repository root).

    Refuses before writing anything if a sample version exists, unless `force`.
    """
    out = Path(out)
    existing = _existing(out)
    if existing and not force:
        listed = ", ".join(str(p) for p in existing)
        raise VersionExistsError(f"{listed} already exist(s) (use --force to replace)")
    return [_write_iris(out, force), _write_tickets(out, force)]
