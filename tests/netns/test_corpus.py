"""The corpus of real published configs: what stock OpenVPN accepts, pyovpn must accept too.

See tests/corpus/README.md. Fails when the files pyovpn refuses (and stock accepts) differ from
tests/corpus/expected_refusals.txt, in either direction.
"""

from __future__ import annotations

from pathlib import Path

from tests.corpus.corpus_run import corpus_files, load_expected, regressions, run_corpus

MIN_CORPUS = 55


def test_corpus_against_stock(tmp_path: Path) -> None:
    names = corpus_files()
    assert len(names) >= MIN_CORPUS, f"the corpus shrank to {len(names)} files"
    results = run_corpus(names, tmp_path)

    stock_ok = [r.name for r in results if r.stock.verdict == "accepted"]
    ours_ok = [r.name for r in results if r.pyovpn.verdict == "accepted"]
    print(
        f"\ncorpus: stock openvpn accepts {len(stock_ok)}/{len(names)}, "
        f"pyovpn accepts {len(ours_ok)}/{len(names)}"
    )
    for r in results:
        if r.pyovpn.no_effect:
            print(f"  {r.name}: accepted with no effect: {', '.join(r.pyovpn.no_effect)}")

    undecided = [
        f"{r.name} ({impl})"
        for r in results
        for impl, outcome in (("stock", r.stock), ("pyovpn", r.pyovpn))
        if outcome.verdict == "undecided"
    ]
    assert not undecided, f"no verdict in time (machine overloaded?): {undecided}"

    actual = regressions(results)
    expected = load_expected()
    new = {n: actual[n] for n in sorted(set(actual) - set(expected))}
    fixed = sorted(set(expected) - set(actual))
    message = []
    if new:
        message.append(
            "pyovpn now refuses (stock accepts):\n" + "\n".join(f"  {n}: {why}" for n, why in new.items())
        )
    if fixed:
        message.append(
            "pyovpn now accepts (remove from tests/corpus/expected_refusals.txt, or run "
            "`python3 -m tests.corpus.report --write-expected`):\n" + "\n".join(f"  {n}" for n in fixed)
        )
    assert not message, "\n".join(message)
