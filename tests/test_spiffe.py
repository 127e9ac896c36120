"""Workload identities: what counts as a name of this mesh."""

from __future__ import annotations

import pytest

from shoal import spiffe


@pytest.mark.parametrize(
    ("name", "label", "subdomain"),
    [
        ("web", True, True),
        ("api.v2", False, True),
        ("a" * 63, True, True),
        ("a" * 64, False, True),
        ("web\n", False, False),  # `$` alone would take a final newline
        ("Web", False, False),
        ("-web", False, False),
        ("", False, False),
    ],
)
def test_kubernetes_names(name: str, label: bool, subdomain: bool) -> None:
    assert spiffe.is_dns_label(name) is label
    assert spiffe.is_dns_subdomain(name) is subdomain


def test_an_id_with_a_final_newline_in_any_part_is_not_one() -> None:
    for spiffe_id in (
        "spiffe://cluster.local\n/ns/demo/sa/web",
        "spiffe://cluster.local/ns/demo\n/sa/web",
        "spiffe://cluster.local/ns/demo/sa/web\n",
    ):
        with pytest.raises(spiffe.IdentityError):
            spiffe.parse(spiffe_id)
    assert spiffe.parse("spiffe://cluster.local/ns/demo/sa/web") == ("cluster.local", "demo", "web")
