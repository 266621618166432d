"""The union-find of coupling units (fxmin.units)."""
from hypothesis import given, settings, strategies as st

from fxmin.units import UnitTable


def test_vectorized_unions_give_the_roots_of_pairwise_unions():
    """NOTE [Vectorized union]: the same partition, each set rooted at its least unit."""
    @settings(max_examples=200, deadline=None)
    @given(st.integers(1, 40).flatmap(lambda n: st.tuples(
        st.just(n), st.lists(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=12), max_size=5))))
    def check(case):
        size, batches = case
        table = UnitTable()
        units = table.fresh(size)
        parent = list(range(size))

        def root(u):
            while parent[u] != u:
                u = parent[u]
            return u

        for pairs in batches:
            if pairs:
                first, second = zip(*pairs)
                table.unify(units[list(first)], units[list(second)])
            for a, b in pairs:
                ra, rb = root(a), root(b)
                parent[max(ra, rb)] = min(ra, rb)
            assert table.find(units).tolist() == [root(u) for u in range(size)]

    check()
