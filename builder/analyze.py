"""`mapbuild analyze`: a data report a person can open (Markdown with PNG plots), and its figures as JSON."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from runtime.data import labels_of, read_rows
from runtime.labels import fit_label_space

from .dataset import conflicts, exact_duplicates, with_correctness
from .stages import REPORT, atomic_dir


MIN_SHIFT_ROWS = 100  # fewer test rows than this make a length histogram of noise (Kaggle's public test has 3)


def question_order(ids) -> list:
    """Question ids as numbers sort (31772 before 109465), whatever their spelling; others after, as text."""
    return sorted(set(ids), key=lambda q: (0, int(q), "") if str(q).isdigit() else (1, 0, str(q)))


def cell(text: str, width: int = 160) -> str:
    """Text for one Markdown table cell: on one line, its pipes escaped, shortened at a word (never mid-word)."""
    return textwrap.shorten(str(text), width=width, placeholder=" …").replace("|", "\\|")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(counts: pd.Series, title: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.22 * len(counts)))
    counts.sort_values().plot.barh(ax=ax)
    ax.bar_label(ax.containers[0], padding=2, fontsize=8)
    ax.set_xscale("log")  # NA and True_Correct dwarf the rare labels, which matter as much to MAP@3
    ax.set(title=title, xlabel="rows (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def per_question_plot(df: pd.DataFrame, path: Path) -> None:
    """Rows per question and category as an annotated grid: a stacked bar hides the small categories
    (False_Correct is 1% of rows) under the big ones."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    table = pd.crosstab(df["QuestionId"], df["Category"]).reindex(question_order(df["QuestionId"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * table.shape[1], 1.2 + 0.36 * len(table)))
    ax.imshow(table.to_numpy().clip(min=0.5), cmap="Blues", norm=LogNorm(vmin=0.5, vmax=max(float(table.to_numpy().max()), 1.0)), aspect="auto")
    for (i, j), n in np.ndenumerate(table.to_numpy()):
        ax.text(j, i, f"{n:,}", ha="center", va="center", fontsize=8, color="white" if n > table.to_numpy().max() / 8 else "black")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=20, ha="right")
    ax.set_yticks(range(len(table)), table.index)
    ax.set(title="Rows per question and category (colour: log scale)", xlabel="Category", ylabel="QuestionId")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def length_plot(groups: dict[str, pd.Series], title: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    top = max(float(s.quantile(0.995)) for s in groups.values())
    for name, s in groups.items():
        # Whole-word bins (2 wide) avoid the comb that fractional bins make of integer counts. Each row weighs
        # 1/len, so a bar is the share of the group's rows in its bin (density=True would divide by the bin width).
        ax.hist(s.clip(upper=top), bins=np.arange(0, top + 3, 2), weights=np.full(len(s), 1 / len(s)), histtype="step", linewidth=1.5,
                label=f"{name} (median {s.median():.0f}, {len(s):,} rows)")
    ax.set(title=title, xlabel="words in StudentExplanation (bins of 2; the last holds the top 0.5%)", ylabel="share of the group's rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def words(df: pd.DataFrame) -> pd.Series:
    return df["StudentExplanation"].str.split().str.len().fillna(0).astype(int)


def describe(s: pd.Series) -> dict:
    return {"mean": round(float(s.mean()), 1), "p50": float(s.median()), "p95": float(s.quantile(0.95)), "max": int(s.max())}


def figures(train: pd.DataFrame, test: pd.DataFrame | None = None) -> dict:
    """Every number the report shows."""
    space = fit_label_space(train)
    labels = labels_of(train)
    checked = with_correctness(train, space)
    bad = checked[checked["agrees"] == False]  # noqa: E712 (None means unknown, not disagreeing)
    clashes = conflicts(train)
    candidates = pd.Series(space.candidate_mask(train).sum(1), index=train.index)
    out = {
        "rows": len(train),
        "questions": train["QuestionId"].nunique(),
        "labels": labels.nunique(),
        "category": labels.str.split(":").str[0].value_counts().to_dict(),
        "misconception": train["Misconception"].value_counts().to_dict(),
        "label": labels.value_counts().to_dict(),
        "exact_duplicates": int(exact_duplicates(train).sum()),
        "duplicate_inputs": int(train.duplicated(["QuestionId", "QuestionText", "MC_Answer", "StudentExplanation"]).sum()),
        "conflict_groups": len(clashes),
        "conflict_rows": int(clashes["rows"].sum()),
        "conflict_examples": clashes.head(20).to_dict("records"),
        "disagreeing_rows": len(bad),
        "disagreeing_by_question": bad["QuestionId"].value_counts().to_dict(),
        "disagreeing_row_ids": bad["row_id"].tolist(),
        "correctness_agreement": round(float((checked["agrees"] == True).mean()), 5),  # noqa: E712
        "explanation_words": describe(words(train)),
        "questions_detail": {
            q: {
                "rows": int((train["QuestionId"] == q).sum()),
                "correct_answer": space.correct.get(q, ""),
                "answers": space.answers.get(q, []),
                "misconceptions": space.misconceptions.get(q, []),
                "candidates_per_row": sorted(int(c) for c in candidates[train["QuestionId"] == q].unique()),
            }
            for q in question_order(train["QuestionId"])
        },
    }
    if test is not None:
        seen_answers = train.groupby("QuestionId")["MC_Answer"].agg(set).to_dict()
        unseen_q = ~test["QuestionId"].isin(seen_answers)
        unseen_a = [q in seen_answers and a not in seen_answers[q] for q, a in zip(test["QuestionId"], test["MC_Answer"])]
        out["test"] = {
            "rows": len(test),
            "unseen_question_rows": int(unseen_q.sum()),
            "unseen_questions": sorted(test.loc[unseen_q, "QuestionId"].unique().tolist()),
            "unseen_answer_rows": int(np.sum(unseen_a)),
            "explanation_words": describe(words(test)),
            "full_label_space_rows": int(space.candidate_mask(test).all(1).sum()),
        }
    return out


def table(d: dict, key: str, value: str) -> str:
    return pd.DataFrame(list(d.items()), columns=[key, value]).to_markdown(index=False)


def examples(train: pd.DataFrame, f: dict, limit: int = 20) -> str:
    """The rows that disagree with correctness, and the first conflicting inputs, as Markdown tables."""
    bad = train[train["row_id"].isin(f["disagreeing_row_ids"])].head(limit)
    parts = []
    if len(bad):
        shown = bad.assign(label=labels_of(bad), StudentExplanation=bad["StudentExplanation"].map(cell), MC_Answer=bad["MC_Answer"].map(cell))
        shown = shown[["row_id", "QuestionId", "MC_Answer", "label", "StudentExplanation"]]
        parts.append("Rows whose prefix contradicts correctness:\n\n" + shown.to_markdown(index=False))
    clashes = pd.DataFrame(f["conflict_examples"][:limit])
    if len(clashes):
        shown = clashes.assign(labels=clashes["labels"].map(lambda d: ", ".join(f"{k} x{v}" for k, v in d.items())),
                               StudentExplanation=clashes["StudentExplanation"].map(cell), MC_Answer=clashes["MC_Answer"].map(cell))  # fmt: skip
        parts.append("Inputs with conflicting labels:\n\n" + shown[["QuestionId", "MC_Answer", "StudentExplanation", "labels"]].to_markdown(index=False))
    return "\n\n".join(["## Inconsistent labels", *parts]) if parts else ""


def report_markdown(f: dict, train: pd.DataFrame, samples: int) -> str:
    q_rows = [
        {"QuestionId": q, "rows": d["rows"], "correct answer": cell(d["correct_answer"]), "answers": len(d["answers"]),
         "misconceptions": ", ".join(d["misconceptions"]) or "-", "candidates per row": ", ".join(map(str, d["candidates_per_row"]))}
        for q, d in f["questions_detail"].items()
    ]
    parts = [
        "# MAP training data report",
        f"{f['rows']} rows, {f['questions']} questions, {f['labels']} labels.",
        "## Categories\n![categories](categories.png)\n\n" + table(f["category"], "Category", "rows"),
        "## Misconceptions\n![misconceptions](misconceptions.png)",
        "## Labels\n![labels](labels.png)",
        "## Per question\n![per question](per_question.png)\n\nWhat each question admits; a row's candidates are the labels "
        "the kernel's mask keeps (prefix from correctness, misconceptions of its question).\n\n" + pd.DataFrame(q_rows).to_markdown(index=False),
        "## Explanation length\n![explanation length](explanation_length.png)\n\n" + table(f["explanation_words"], "words", "value"),
        f"## Duplicates and conflicts\n- exact duplicates (input and label; copies after the first): {f['exact_duplicates']}\n"
        f"- duplicate inputs, any label: {f['duplicate_inputs']}\n"
        f"- inputs with conflicting labels: {f['conflict_groups']} groups, {f['conflict_rows']} rows",
        f"## Correctness rule\nThe correct answer of a question is its most frequent `MC_Answer` among `True_*` rows. "
        f"The label prefix agrees with it on {f['correctness_agreement']:.2%} of rows; {f['disagreeing_rows']} rows disagree"
        + (":\n\n" + table(f["disagreeing_by_question"], "QuestionId", "rows") if f["disagreeing_rows"] else "."),
        examples(train, f),
        "## Sample rows",
    ]
    groups = dict(list(train.groupby("QuestionId")))
    for q in question_order(groups):
        group = groups[q]
        # A seeded random sample: the file's first rows of a question are not typical of it.
        show = group.sample(min(samples, len(group)), random_state=0)
        show = show.assign(label=labels_of(show), StudentExplanation=show["StudentExplanation"].map(cell), MC_Answer=show["MC_Answer"].map(cell))
        title = textwrap.shorten(group["QuestionText"].iloc[0], width=200, placeholder=" …")
        parts.append(f"### {q}: {title}\n\n" + show[["MC_Answer", "StudentExplanation", "label"]].to_markdown(index=False))
    if "test" in f:
        t = f["test"]
        shift = "![length shift](length_shift.png)" if t["rows"] >= MIN_SHIFT_ROWS else f"(no length plot from {t['rows']} rows: it takes {MIN_SHIFT_ROWS})"
        parts.append(
            f"## Test against train\n{shift}\n\n- test rows: {t['rows']}\n"
            f"- rows of unseen questions: {t['unseen_question_rows']} ({', '.join(t['unseen_questions']) or 'none'})\n"
            f"- rows with an answer unseen for their question: {t['unseen_answer_rows']}\n"
            f"- rows that fall back to the whole label space: {t['full_label_space_rows']}\n"
            f"- median explanation words: train {f['explanation_words']['p50']:.0f}, test {t['explanation_words']['p50']:.0f}"
        )
    return "\n\n".join(p for p in parts if p) + "\n"


def analyze(train_csv: str | os.PathLike, out: str | os.PathLike, test_csv: str | os.PathLike | None = None, samples: int = 3) -> dict:
    """Write REPORT_DIR with report.md, its PNG plots and summary.json; returns the figures."""
    train = read_rows(train_csv, labelled=True)
    test = read_rows(test_csv) if test_csv else None
    f = figures(train, test)
    with atomic_dir(out, REPORT) as tmp:
        bar_plot(pd.Series(f["category"]), "Category", tmp / "categories.png")
        bar_plot(pd.Series(f["misconception"]), "Misconception", tmp / "misconceptions.png")
        bar_plot(pd.Series(f["label"]), "Category:Misconception", tmp / "labels.png")
        per_question_plot(train, tmp / "per_question.png")
        length_plot({c: words(g) for c, g in train.groupby("Category")}, "Explanation length by category", tmp / "explanation_length.png")
        if test is not None and len(test) >= MIN_SHIFT_ROWS:
            length_plot({"train": words(train), "test": words(test)}, "Explanation length, test against train", tmp / "length_shift.png")
        (tmp / "report.md").write_text(report_markdown(f, train, samples))
        # the files written, so that analyzing into this folder again replaces these alone (stages.check_out)
        (tmp / "summary.json").write_text(json.dumps(f | {"files": sorted(p.name for p in tmp.iterdir())}, indent=1, default=int))
    return f
