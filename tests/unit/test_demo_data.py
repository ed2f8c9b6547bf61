import re

from bookshop.services.demo_data import demo_books, demo_stock_levels
from bookshop.services.isbn import is_valid_isbn, normalize_isbn

KEYS = {"isbn", "title", "authors", "category", "price_cents", "currency", "description",
        "published_year"}


def test_default_count_and_shape():
    books = demo_books()
    assert len(books) == 120
    for book in books:
        assert set(book) == KEYS
        assert isinstance(book["title"], str) and book["title"].strip() == book["title"] != ""
        assert 1 <= len(book["authors"]) <= 2
        assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", name) for name in book["authors"])
        assert len(set(book["authors"])) == len(book["authors"])
        assert re.fullmatch(r"[a-z]+(?:-[a-z]+)*", book["category"])
        assert type(book["price_cents"]) is int and 499 <= book["price_cents"] <= 5999
        assert book["currency"] == "EUR"
        assert book["description"][0].isupper() and book["description"].endswith(".")
        assert book["description"].count(".") == 1
        assert type(book["published_year"]) is int and 1950 <= book["published_year"] <= 2026


def test_other_counts():
    assert demo_books(0) == []
    assert len(demo_books(5)) == 5
    assert len(demo_books(500)) == 500


def test_isbns_valid_unique_978():
    books = demo_books(500)
    isbns = [b["isbn"] for b in books]
    assert len(set(isbns)) == len(isbns)
    for isbn in isbns:
        assert re.fullmatch(r"978[0-9]{10}", isbn)
        assert is_valid_isbn(isbn)
        assert normalize_isbn(isbn) == isbn


def test_titles_unique():
    for count in (120, 1000):
        titles = [b["title"] for b in demo_books(count)]
        assert len(set(titles)) == len(titles)


def test_at_least_eight_categories():
    assert len({b["category"] for b in demo_books()}) >= 8
    assert len({b["category"] for b in demo_books(10)}) >= 8


def test_deterministic():
    assert demo_books() == demo_books()
    assert demo_books(50, seed=3) == demo_books(50, seed=3)
    assert demo_books(50, seed=3) != demo_books(50, seed=4)
    # A shorter catalogue is a prefix of a longer one with the same seed.
    assert demo_books(30) == demo_books(120)[:30]


def test_stock_levels():
    books = demo_books()
    levels = demo_stock_levels(books)
    assert set(levels) == {b["isbn"] for b in books}
    assert all(type(q) is int and 0 <= q <= 60 for q in levels.values())
    low = [q for q in levels.values() if q <= 3]
    assert 2 <= len(low) < len(books) // 2
    assert any(q > 30 for q in levels.values())


def test_stock_levels_deterministic_and_order_independent():
    books = demo_books()
    assert demo_stock_levels(books) == demo_stock_levels(books)
    assert demo_stock_levels(list(reversed(books))) == demo_stock_levels(books)
    assert demo_stock_levels(books, seed=8) != demo_stock_levels(books)
    assert demo_stock_levels([]) == {}
