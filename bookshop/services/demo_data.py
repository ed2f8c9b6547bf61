"""Deterministic, made-up demo catalogue.

Books are generated from word lists with a seeded ``random.Random``: the same ``count`` and ``seed``
always give the same books, on every machine and Python run (string seeds are hashed with SHA-512 by
``random``, not with the per-process ``hash()``). Nothing is downloaded; every title, author and ISBN
is invented (ISBNs are checksum-valid, 978-prefixed, in the English-language groups 0 and 1).
"""
from __future__ import annotations

import datetime
import random

from bookshop.services.isbn import isbn13_check_digit

CURRENCY = "EUR"
MIN_PRICE_CENTS = 499
MAX_PRICE_CENTS = 5999
MIN_YEAR = 1950
MAX_YEAR = 2026
MAX_STOCK = 60
LOW_STOCK_MAX = 3

FIRST_NAMES = (
    "Ada", "Alma", "Amos", "Anton", "Beatrix", "Bruno", "Camille", "Cecil", "Clara", "Dafne",
    "Edith", "Elias", "Esme", "Felix", "Flora", "Gideon", "Greta", "Hana", "Hugo", "Ines",
    "Isidore", "Ivo", "Jonas", "Judith", "Kasimir", "Lena", "Leon", "Lidia", "Magnus", "Marta",
    "Milo", "Nadia", "Nils", "Odile", "Oskar", "Petra", "Quentin", "Rosa", "Rufus", "Selma",
    "Silas", "Tessa", "Theo", "Ulla", "Vera", "Viktor", "Wanda", "Yusuf", "Zelda", "Zora",
)

SURNAMES = (
    "Abernathy", "Albrecht", "Ashdown", "Bellamy", "Birkeland", "Calloway", "Castellan", "Daventry",
    "Delacroix", "Ellery", "Fairbairn", "Falkner", "Garrow", "Hadley", "Halloran", "Ingleby",
    "Jessop", "Kessler", "Lindqvist", "Lockhart", "Marchetti", "Merriweather", "Novak", "Oakes",
    "Okafor", "Pemberton", "Quayle", "Ravensworth", "Rinaldi", "Sato", "Selwyn", "Sorensen",
    "Thackeray", "Underhill", "Vance", "Varga", "Whitlock", "Wolstencroft", "Yardley", "Zeller",
)

# Shared word lists, used by several categories' templates.
_ADJ = (
    "Silent", "Hidden", "Lost", "Last", "Quiet", "Crimson", "Distant", "Forgotten", "Golden",
    "Broken", "Winter", "Secret", "Hollow", "Restless", "Patient", "Borrowed", "Pale", "Northern",
)
_PERSON = (
    "Cartographer", "Lighthouse Keeper", "Clockmaker", "Ferryman", "Archivist", "Beekeeper",
    "Translator", "Glassblower", "Orchardist", "Stationmaster", "Bookbinder", "Apprentice",
)
_PLACE = (
    "Harbour", "Orchard", "Valley", "Island", "Garden", "Lantern House", "Salt Marsh", "Observatory",
    "Boarding House", "Mill", "Quarry", "Causeway",
)
_SUBSTANCE = (
    "Salt", "Paper", "Glass", "Sugar", "Ink", "Iron", "Silk", "Pepper", "Coffee", "Tea", "Copper",
    "Cotton", "Amber", "Rubber", "Indigo", "Timber",
)
_CITY = (
    "Lisbon", "Trieste", "Kraków", "Valparaíso", "Tangier", "Kyoto", "Riga", "Porto", "Oaxaca",
    "Tbilisi", "Bergen", "Palermo", "Ghent", "Hanoi", "Ljubljana", "Montevideo",
)
_REGION = (
    "the Alps", "the Baltic Coast", "the Andes", "Patagonia", "the Highlands", "the Danube",
    "the Atlas Mountains", "the Dolomites", "Lapland", "the Balkans", "Anatolia", "the Pyrenees",
)
_SCIENCE = (
    "Light", "Gravity", "Entropy", "Symmetry", "Time", "Tides", "Clouds", "Fungi", "Bees", "Ice",
    "Magnetism", "Cells", "Rivers", "Stars", "Volcanoes", "Seeds",
)
_TECH = (
    "Python", "Distributed Systems", "Compilers", "Databases", "Networking", "Cryptography",
    "Operating Systems", "Algorithms", "Concurrency", "Type Systems", "Web Services", "Testing",
)
_FOOD = (
    "Bread", "Soup", "Lemons", "Dumplings", "Noodles", "Beans", "Mushrooms", "Pickles", "Rice",
    "Tomatoes", "Olive Oil", "Cheese", "Pies", "Spices", "Fish", "Vegetables",
)
_IDEA = (
    "Doubt", "Freedom", "Virtue", "Memory", "Justice", "Friendship", "Solitude", "Happiness",
    "Truth", "Attention", "Boredom", "Courage", "Wonder", "Habit", "Patience", "Leisure",
)
_ANIMAL = (
    "Fox", "Badger", "Hedgehog", "Owl", "Otter", "Mouse", "Bear", "Rabbit", "Tortoise", "Whale",
    "Penguin", "Dragon", "Squirrel", "Goose",
)
_ART = (
    "Colour", "Drawing", "Portraits", "Light", "Ornament", "Woodcut", "Watercolour", "Sculpture",
    "Line", "Landscape", "Pattern", "Ceramics", "Typography", "Photography",
)
_NUMBER = ("Seven", "Twelve", "Twenty", "Forty", "Fifty", "A Hundred")

CATEGORIES: dict[str, dict] = {
    "fiction": {
        "templates": (
            "The {adj} {person}", "The {person}'s Daughter", "A {adj} Season", "The {adj} {place}",
            "Night at the {place}", "The {person} of {city}",
        ),
        "blurb": "{tone} novel about {theme}.",
        "themes": ("a family secret", "a summer that changed everything", "love and loss by the sea",
                   "an inheritance nobody wanted", "two strangers on a night train"),
    },
    "science": {
        "templates": (
            "The Hidden Life of {science}", "On {science}", "What {science} Knows",
            "A Field Guide to {science}", "The Physics of {science}",
        ),
        "blurb": "{tone} introduction to {theme}.",
        "themes": ("how the natural world works", "the questions scientists still argue about",
                   "the experiments that shaped modern science", "patterns hidden in everyday things"),
    },
    "history": {
        "templates": (
            "A Short History of {substance}", "The {substance} Road", "Empires of {substance}",
            "{city}: A Biography", "The Fall of {city}", "The {substance} Merchants of {city}",
        ),
        "blurb": "{tone} history of {theme}.",
        "themes": ("trade, power and ordinary lives", "a city at the crossroads of empires",
                   "the people history forgot", "one commodity that remade the world"),
    },
    "children": {
        "templates": (
            "The {animal} Who Wanted to Fly", "Goodnight, Little {animal}", "The Brave Little {animal}",
            "{name} and the {adj} {animal}", "Where Is the {animal}?",
        ),
        "blurb": "{tone} picture book about {theme}.",
        "themes": ("friendship and sharing", "being brave in the dark", "finding the way home",
                   "a very big adventure for someone very small"),
    },
    "travel": {
        "templates": (
            "Walking {region}", "Slow Roads Through {region}", "A Week in {city}",
            "Letters from {city}", "Trains Across {region}", "The Back Streets of {city}",
        ),
        "blurb": "{tone} travel book about {theme}.",
        "themes": ("slow journeys and chance encounters", "markets, cafés and back streets",
                   "mountain paths and village inns", "the places guidebooks leave out"),
    },
    "cooking": {
        "templates": (
            "{number} Ways with {food}", "The {adj} Kitchen", "Simple {food}",
            "The Little Book of {food}", "Cooking with {food}", "{food} from {city}",
        ),
        "blurb": "{tone} cookbook about {theme}.",
        "themes": ("weeknight dinners from the pantry", "seasonal food and simple techniques",
                   "recipes handed down through generations", "cooking for friends without fuss"),
    },
    "poetry": {
        "templates": (
            "{adj} Hours", "Songs for a {adj} Morning", "The {adj} Field", "Poems from the {place}",
            "Elegies for {city}", "Small Hymns to {idea}",
        ),
        "blurb": "{tone} collection of poems about {theme}.",
        "themes": ("weather, grief and small mercies", "cities at dawn", "the sea and its keepers",
                   "love in middle age"),
    },
    "computing": {
        "templates": (
            "Practical {tech}", "{tech} in Depth", "Understanding {tech}", "The Art of {tech}",
            "{tech} from First Principles", "Designing {tech}",
        ),
        "blurb": "{tone} guide to {theme}.",
        "min_year": 1975,
        "themes": ("building reliable software", "the ideas behind modern systems",
                   "writing code that others can maintain", "performance, correctness and trade-offs"),
    },
    "philosophy": {
        "templates": (
            "On {idea}", "The Problem of {idea}", "In Praise of {idea}", "A Brief Inquiry into {idea}",
            "{idea} and Its Discontents", "The Ethics of {idea}",
        ),
        "blurb": "{tone} essay on {theme}.",
        "themes": ("how we ought to live", "old questions in a noisy age", "what we owe each other",
                   "the limits of what we can know"),
    },
    "art": {
        "templates": (
            "The Language of {art}", "A History of {art}", "Seeing {art}", "The {adj} Studio",
            "{art} and Its Makers", "Ways of {art}",
        ),
        "blurb": "{tone} study of {theme}.",
        "themes": ("how artists learn to see", "craft, tradition and invention",
                   "forgotten workshops and their masters", "images that changed how we look"),
    },
}

_TONES = ("gripping", "lyrical", "warm", "witty", "thoughtful", "vivid", "clear", "moving", "playful",
          "richly illustrated", "accessible", "beautifully written")


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        adj=rng.choice(_ADJ), person=rng.choice(_PERSON), place=rng.choice(_PLACE),
        substance=rng.choice(_SUBSTANCE), city=rng.choice(_CITY), region=rng.choice(_REGION),
        science=rng.choice(_SCIENCE), tech=rng.choice(_TECH), food=rng.choice(_FOOD),
        idea=rng.choice(_IDEA), animal=rng.choice(_ANIMAL), art=rng.choice(_ART),
        number=rng.choice(_NUMBER), name=rng.choice(FIRST_NAMES),
    )


def _author(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"


def _isbn(rng: random.Random) -> str:
    # 978 + group (0 or 1, English) + 8 random digits + check digit.
    first12 = "978" + rng.choice("01") + f"{rng.randrange(10 ** 8):08d}"
    return first12 + isbn13_check_digit(first12)


def _title(category: str, rng: random.Random, taken: set[str]) -> str:
    templates = CATEGORIES[category]["templates"]
    for _ in range(50):
        title = _fill(rng.choice(templates), rng)
        if title not in taken:
            return title
    # The word lists are nearly exhausted for this category: fall back on an edition/volume suffix.
    base = _fill(rng.choice(templates), rng)
    n = 2
    while f"{base}, Volume {n}" in taken:
        n += 1
    return f"{base}, Volume {n}"


def demo_books(count: int = 120, seed: int = 7) -> list[dict]:
    """``count`` made-up books, the same for the same ``(count, seed)``.

    Categories take turns (round robin over :data:`CATEGORIES`), so any ``count`` of at least
    ``len(CATEGORIES)`` covers every category. ISBNs and titles are unique.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError("count must be a non-negative int")
    rng = random.Random(f"bookshop-demo-books:{seed}")
    categories = list(CATEGORIES)
    books: list[dict] = []
    isbns: set[str] = set()
    titles: set[str] = set()
    for i in range(count):
        category = categories[i % len(categories)]
        spec = CATEGORIES[category]
        isbn = _isbn(rng)
        while isbn in isbns:
            isbn = _isbn(rng)
        isbns.add(isbn)
        title = _title(category, rng, titles)
        titles.add(title)
        authors = [_author(rng)]
        if rng.random() < 0.25:
            second = _author(rng)
            while second == authors[0]:
                second = _author(rng)
            authors.append(second)
        tone = rng.choice(_TONES)
        tone = ("an " if tone[0] in "aeiou" else "a ") + tone
        description = spec["blurb"].format(tone=tone, theme=rng.choice(spec["themes"]))
        description = description[0].upper() + description[1:]
        books.append({
            "isbn": isbn,
            "title": title,
            "authors": authors,
            "category": category,
            "price_cents": rng.randrange(MIN_PRICE_CENTS // 100, MAX_PRICE_CENTS // 100 + 1) * 100 + 99,
            "currency": CURRENCY,
            "description": description,
            "published_year": rng.randint(spec.get("min_year", MIN_YEAR), MAX_YEAR),
        })
    return books


def demo_stock_levels(books: list[dict], seed: int = 7) -> dict[str, int]:
    """Stock quantity (0..60) per ISBN of ``books``, deterministic per ``(isbn, seed)``.

    About one title in eight gets 0..3 copies, so "low stock" and "out of stock" show up in the demo.
    A book's level does not depend on its position in the list or on the other books.
    """
    levels: dict[str, int] = {}
    for book in books:
        isbn = book["isbn"]
        rng = random.Random(f"bookshop-demo-stock:{seed}:{isbn}")
        if rng.random() < 0.125:
            levels[isbn] = rng.randint(0, LOW_STOCK_MAX)
        else:
            levels[isbn] = rng.randint(LOW_STOCK_MAX + 1, MAX_STOCK)
    return levels


# -- a made-up purchase history ----------------------------------------------------------------------------------
DEMO_ORDERS_MAX = 500
DEMO_READERS = 120
DEMO_PATTERNS = 6
DEMO_DAYS = 180


def demo_patterns(books: list[dict]) -> list[list[str]]:
    """The tastes of the demo history: ``DEMO_PATTERNS`` groups of three books, each over three categories
    ("readers of X also buy Y and Z")."""
    by_category: dict[str, list[dict]] = {}
    for book in books:
        by_category.setdefault(book["category"], []).append(book)
    categories = list(by_category)
    if len(categories) < 3:
        return []
    patterns = []
    for k in range(min(DEMO_PATTERNS, len(categories))):
        picks = [by_category[categories[(k + step) % len(categories)]] for step in (0, 3, 6)]
        group = [shelf[k % len(shelf)]["isbn"] for shelf in picks]  # the k-th of each: patterns share no book
        if len(set(group)) == 3:
            patterns.append(group)
    return patterns


def demo_purchases(books: list[dict], today: datetime.date, seed: int = 7) -> list[dict]:
    """At most ``DEMO_ORDERS_MAX`` made-up confirmed orders of ``DEMO_READERS`` made-up readers, all before
    ``today`` (within ``DEMO_DAYS`` days), the same for the same books, day and seed. Most readers follow one of
    the :func:`demo_patterns`; the others buy at random. Each order: ``{id, user_id, created_at, items:
    [{isbn, title, quantity, unit_price_cents}]}``, ids growing with ``created_at`` (as ObjectIds do)."""
    if not books:
        return []
    rng = random.Random(f"bookshop-demo-orders:{seed}")
    by_isbn = {b["isbn"]: b for b in books}
    everything = sorted(by_isbn)
    patterns = demo_patterns(books)
    midnight = datetime.datetime.combine(today, datetime.time(), tzinfo=datetime.timezone.utc)
    orders: list[dict] = []
    for reader in range(DEMO_READERS):
        user_id = f"demo-reader-{reader + 1:03d}"
        taste = patterns[reader % len(patterns)] if patterns and reader % 8 != 7 else []
        bought: list[str] = []
        times = sorted(midnight - datetime.timedelta(seconds=rng.randrange(60, DEMO_DAYS * 86400))
                       for _ in range(rng.randint(2, 5)))
        for at in times:
            lines = []
            for _ in range(rng.choice((1, 1, 2))):
                pool = [i for i in taste if i not in bought] if rng.random() < 0.8 else []
                pool = pool or [i for i in everything if i not in bought]
                if pool:
                    isbn = rng.choice(pool)
                    bought.append(isbn)
                    lines.append(isbn)
            if lines and len(orders) < DEMO_ORDERS_MAX:
                orders.append({
                    "id": f"{int(at.timestamp()):08x}{rng.randrange(16 ** 16):016x}", "user_id": user_id,
                    "created_at": at,
                    "items": [{"isbn": i, "title": by_isbn[i]["title"], "quantity": 1,
                               "unit_price_cents": by_isbn[i]["price_cents"]} for i in lines]})
    return sorted(orders, key=lambda o: o["id"])


def demo_orders(books: list[dict], today: datetime.date, currency: str = CURRENCY, seed: int = 7) -> list[dict]:
    """:func:`demo_purchases` as the orders service stores them: confirmed, made up (``demo: true``), never
    charged (no charge exists at the payments service; ``last4`` is ``0000``), with their history."""
    out = []
    for order in demo_purchases(books, today, seed):
        total = sum(i["quantity"] * i["unit_price_cents"] for i in order["items"])
        at = order["created_at"]
        reader = int(order["user_id"].rsplit("-", 1)[1])
        out.append({
            "_id": order["id"], "user_id": order["user_id"], "status": "CONFIRMED", "items": order["items"],
            "subtotal_cents": total, "discount_cents": 0, "total_cents": total, "currency": currency,
            "promotion_applied": False,
            "shipping_address": {"name": f"Demo Reader {reader}", "line1": f"{reader} Demo Street",
                                 "city": "Lyon", "postal_code": "69001", "country": "FR"},
            "payment": {"status": "charged", "last4": "0000"},
            "history": [{"status": "PENDING", "at": at, "by": order["user_id"]},
                        {"status": "CONFIRMED", "at": at + datetime.timedelta(seconds=2), "by": "system"}],
            "created_at": at, "updated_at": at + datetime.timedelta(seconds=2), "from_cart": False,
            "open": False, "todo": [], "demo": True,
        })
    return out
