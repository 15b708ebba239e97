"""Document keys: every rendering a database gives comes out in the one canonical form."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from exchange.database.rows import canonical_key, canonicalize

values = st.lists(st.one_of(st.text(max_size=12), st.integers().map(str)), min_size=1, max_size=4)


@given(values)
def test_every_rendering_of_a_key_is_made_canonical(key: list[str]) -> None:
    want = canonical_key(key)
    assert canonicalize(want) == want
    assert canonicalize(json.dumps(key)) == want  # PostgreSQL's jsonb::text: a space after each comma
    assert canonicalize(json.dumps(key, ensure_ascii=False, separators=(",", ":"))) == want  # SQLite json_array


@given(st.lists(st.integers(), min_size=1, max_size=3))
def test_numbers_in_a_key_become_text(key: list[int]) -> None:
    assert canonicalize(json.dumps(key)) == canonical_key([str(v) for v in key])
