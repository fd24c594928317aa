"""A deterministic synthetic shop: a catalogue with text, customers with tastes, and their purchase logs.

``generate_shop(out_dir, scale, seed)`` writes three parquet files in the shop's own column names (the
``examples/shop.yaml`` config maps them):

* ``interactions.parquet``: ``customer`` ("C00042"), ``product`` ("P00123"), ``ts`` (datetime64),
  ``qty``; one row per purchase, in time order.
* ``items.parquet``: ``sku``, ``name``, ``description``, ``category``, ``brand``, ``tags`` (a list of
  strings), ``price``.
* ``users.parquet``: ``customer``, ``segment`` (budget / mainstream / premium), ``region``.

How it is built, so that co-occurrence, order and text all carry signal:

* 12 topics (running, coffee, camping, ...). Every product belongs to one topic, is a main product or an
  accessory, and has a brand of the topic with a price tier; its name, description, category and tags are
  made of the topic's words. Product popularity is heavy-tailed (log-normal).
* Every customer has 1-3 tastes (topics, drawn with a regional tilt) with Dirichlet weights, and a
  segment that favours a brand tier.
* A customer's sessions pick a topic from the tastes (the previous session's topic half of the time, a
  random one 8% of the time), buy a main product of that topic, then 0-3 of that product's linked
  accessories minutes later. The links favour accessories of the same brand and accessories whose
  description says they are made for that kind of product ("Made for your trail shoes"); a main
  product's description names the accessory it is bought with most ("Pairs well with the insoles").

Everything is vectorised numpy (the scale benchmark calls it with ``scale=100``: 200,000 customers,
150,000 products, about 5 million purchases) and depends only on ``seed`` and ``scale``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

USERS_PER_SCALE = 2000
ITEMS_PER_SCALE = 1500
SESSIONS_PER_USER = 11.5
LINKED_ACCESSORIES = 6
MAX_ACCESSORIES_PER_SESSION = 3
ACCESSORY_PROBABILITY = 0.45
STICKY_TOPIC = 0.5
EXPLORE = 0.08
MAIN_SHARE = 0.35
START = np.datetime64("2024-01-01T00:00:00", "s")
DAYS = 365

SEGMENTS = ("budget", "mainstream", "premium")
REGIONS = ("north", "south", "east", "west")
TIERS = ("budget", "mid", "premium")
# segment x tier: how much a segment prefers each brand tier
TIER_AFFINITY = np.array([[1.0, 0.45, 0.12], [0.55, 1.0, 0.45], [0.15, 0.55, 1.0]])
TIER_PRICE = np.array([0.6, 1.0, 1.9])
TIER_SENTENCE = (
    "Great value for everyday use.",
    "Reliable quality at a fair price.",
    "Premium materials and careful craftsmanship.",
)

# name, department, main products, accessories, adjectives, uses, tags, brands (name, tier index)
TOPICS: tuple[dict[str, Any], ...] = (
    {
        "name": "Running",
        "department": "Sports",
        "main": ["Running Shoes", "Trail Shoes", "Racing Flats", "GPS Running Watch", "Treadmill"],
        "accessory": [
            "Running Socks",
            "Energy Gels",
            "Hydration Vest",
            "Reflective Armband",
            "Insoles",
            "Running Cap",
            "Foam Roller",
            "Water Bottle",
        ],
        "adjective": ["Lightweight", "Cushioned", "Breathable", "Responsive", "Trail-ready"],
        "use": ["marathon training", "daily runs", "trail running", "interval sessions"],
        "tags": ["running", "cardio", "endurance", "fitness", "race"],
        "brands": [("Stridex", 0), ("Pacewell", 1), ("Aerolope", 2), ("Kinetiq", 1)],
    },
    {
        "name": "Coffee",
        "department": "Kitchen",
        "main": ["Espresso Machine", "Burr Grinder", "Pour-Over Kettle", "French Press", "Moka Pot"],
        "accessory": [
            "Whole Bean Coffee",
            "Paper Filters",
            "Milk Frother",
            "Descaling Tablets",
            "Espresso Tamper",
            "Coffee Scale",
            "Ceramic Mug",
            "Knock Box",
        ],
        "adjective": ["Barista-grade", "Compact", "Stainless", "Programmable", "Classic"],
        "use": ["morning espresso", "slow pour-over brewing", "latte art", "cold brew"],
        "tags": ["coffee", "espresso", "brewing", "caffeine", "barista"],
        "brands": [("Brewmont", 0), ("Crema & Co", 1), ("Baristo", 2), ("Roastwell", 1)],
    },
    {
        "name": "Camping",
        "department": "Outdoor",
        "main": ["Dome Tent", "Sleeping Bag", "Backpacking Stove", "Hiking Backpack", "Camp Hammock"],
        "accessory": [
            "Tent Stakes",
            "Sleeping Pad",
            "Headlamp",
            "Fuel Canister",
            "Water Filter",
            "Camp Mug",
            "Dry Bag",
            "Trekking Poles",
        ],
        "adjective": ["Ultralight", "Weatherproof", "Four-season", "Packable", "Rugged"],
        "use": ["weekend camping", "backcountry trips", "alpine hikes", "festival camping"],
        "tags": ["camping", "hiking", "adventure", "backpacking", "wilderness"],
        "brands": [("Trailfox", 0), ("Summitcraft", 1), ("Northpeak", 2), ("Campora", 1)],
    },
    {
        "name": "Gaming",
        "department": "Electronics",
        "main": ["Gaming Console", "Gaming Laptop", "Gaming Monitor", "VR Headset", "Handheld Console"],
        "accessory": [
            "Wireless Controller",
            "Gaming Headset",
            "Mechanical Keyboard",
            "Gaming Mouse",
            "Charging Dock",
            "Memory Card",
            "Mouse Pad",
            "Capture Card",
        ],
        "adjective": ["High-refresh", "RGB", "Pro-grade", "Low-latency", "Next-gen"],
        "use": ["competitive esports", "couch co-op", "game streaming", "open-world adventures"],
        "tags": ["gaming", "esports", "console", "pc", "streaming"],
        "brands": [("Pixelforge", 0), ("Nexplay", 1), ("Vortex Labs", 2), ("Respawn Gear", 1)],
    },
    {
        "name": "Baking",
        "department": "Kitchen",
        "main": ["Stand Mixer", "Bread Machine", "Convection Oven", "Pasta Maker", "Food Processor"],
        "accessory": [
            "Silicone Baking Mat",
            "Measuring Cups",
            "Sourdough Starter Kit",
            "Piping Bags",
            "Cake Pan",
            "Proofing Basket",
            "Pastry Brush",
            "Cooling Rack",
        ],
        "adjective": ["Heavy-duty", "Nonstick", "Artisan", "Multi-speed", "Countertop"],
        "use": ["sourdough loaves", "holiday cookies", "layer cakes", "fresh pasta"],
        "tags": ["baking", "bread", "pastry", "dessert", "dough"],
        "brands": [("Flourish", 0), ("Doughworks", 1), ("Maison Levain", 2), ("Bakewell", 1)],
    },
    {
        "name": "Yoga",
        "department": "Wellness",
        "main": [
            "Yoga Mat",
            "Meditation Cushion",
            "Pilates Reformer",
            "Balance Board",
            "Resistance Band Set",
        ],
        "accessory": [
            "Yoga Blocks",
            "Mat Strap",
            "Yoga Towel",
            "Essential Oil Roller",
            "Cork Block",
            "Eye Pillow",
            "Grip Socks",
            "Mat Cleaner",
        ],
        "adjective": ["Eco-friendly", "Non-slip", "Extra-thick", "Organic", "Travel"],
        "use": ["a morning flow", "hot yoga", "mindful meditation", "core strength"],
        "tags": ["yoga", "mindfulness", "wellness", "stretching", "pilates"],
        "brands": [("Lotusa", 0), ("Zenpath", 1), ("Prana Studio", 2), ("Stillwater", 1)],
    },
    {
        "name": "Photography",
        "department": "Electronics",
        "main": ["Mirrorless Camera", "DSLR Camera", "Action Camera", "Instant Camera", "Camera Drone"],
        "accessory": [
            "Camera Lens",
            "Tripod",
            "SD Card",
            "Camera Bag",
            "Lens Filter",
            "Spare Battery",
            "Lens Cleaning Kit",
            "Camera Strap",
        ],
        "adjective": ["Full-frame", "Weather-sealed", "4K", "Pocket", "Professional"],
        "use": ["landscape photography", "street shooting", "travel vlogging", "wildlife photos"],
        "tags": ["photography", "camera", "lens", "video", "travel"],
        "brands": [("Shutterly", 0), ("Lumina", 1), ("Aperture One", 2), ("Focalis", 1)],
    },
    {
        "name": "Gardening",
        "department": "Home & Garden",
        "main": [
            "Raised Garden Bed",
            "Cordless Lawn Mower",
            "Greenhouse Kit",
            "Compost Tumbler",
            "Hose Reel",
        ],
        "accessory": [
            "Seed Starter Tray",
            "Pruning Shears",
            "Garden Gloves",
            "Organic Fertilizer",
            "Watering Can",
            "Plant Labels",
            "Kneeling Pad",
            "Tomato Cages",
        ],
        "adjective": ["Galvanized", "Cedar", "Cordless", "Organic", "Weather-resistant"],
        "use": ["vegetable growing", "balcony gardens", "lawn care", "herb gardens"],
        "tags": ["gardening", "plants", "garden", "vegetables", "soil"],
        "brands": [("Greenthumb", 0), ("Rootwise", 1), ("Verdant & Oak", 2), ("Bloomfield", 1)],
    },
    {
        "name": "Cycling",
        "department": "Sports",
        "main": ["Road Bike", "Mountain Bike", "E-Bike", "Smart Trainer", "Gravel Bike"],
        "accessory": [
            "Bike Helmet",
            "Bike Lights",
            "Cycling Gloves",
            "Bike Lock",
            "Bottle Cage",
            "Saddle Bag",
            "Chain Lube",
            "Bike Pump",
        ],
        "adjective": ["Carbon", "Aluminium", "Aero", "All-terrain", "Foldable"],
        "use": ["commuting", "long road rides", "mountain trails", "indoor training"],
        "tags": ["cycling", "bike", "commute", "ride", "trails"],
        "brands": [("Spokeline", 0), ("Velora", 1), ("Apex Cycles", 2), ("Chainring", 1)],
    },
    {
        "name": "Skincare",
        "department": "Beauty",
        "main": ["Facial Serum", "Moisturizer", "Cleansing Balm", "Retinol Cream", "Sunscreen SPF 50"],
        "accessory": [
            "Cotton Pads",
            "Jade Roller",
            "Sheet Masks",
            "Lip Balm",
            "Micellar Water",
            "Toner",
            "Eye Cream",
            "Travel Bottles",
        ],
        "adjective": ["Hydrating", "Fragrance-free", "Vitamin C", "Gentle", "Clinical"],
        "use": ["sensitive skin", "daily hydration", "anti-aging routines", "oily skin"],
        "tags": ["skincare", "beauty", "hydration", "routine", "face"],
        "brands": [("Dewlight", 0), ("Purelle", 1), ("Maison Derme", 2), ("Glowfield", 1)],
    },
    {
        "name": "Music",
        "department": "Instruments",
        "main": ["Acoustic Guitar", "Digital Piano", "Electric Guitar", "Studio Monitors", "Drum Kit"],
        "accessory": [
            "Guitar Strings",
            "Guitar Capo",
            "Clip-on Tuner",
            "Instrument Cable",
            "Sustain Pedal",
            "Drumsticks",
            "Guitar Picks",
            "Music Stand",
        ],
        "adjective": ["Solid-wood", "Weighted-key", "Studio", "Vintage", "Beginner"],
        "use": ["home recording", "live gigs", "learning to play", "jam sessions"],
        "tags": ["music", "guitar", "recording", "instrument", "studio"],
        "brands": [("Harmonix", 0), ("Tonewood", 1), ("Steinhart", 2), ("Riffmaster", 1)],
    },
    {
        "name": "Pets",
        "department": "Pet Supplies",
        "main": ["Dog Bed", "Cat Tree", "Aquarium Kit", "Pet Carrier", "Automatic Feeder"],
        "accessory": [
            "Dog Treats",
            "Cat Litter",
            "Chew Toy",
            "Fish Food",
            "Pet Shampoo",
            "Dog Leash",
            "Scratching Pad",
            "Food Bowl",
        ],
        "adjective": ["Orthopedic", "Washable", "Durable", "Eco", "Cozy"],
        "use": ["large dogs", "indoor cats", "tropical fish", "puppy training"],
        "tags": ["pets", "dog", "cat", "animals", "pet care"],
        "brands": [("Pawsome", 0), ("Tailwag", 1), ("Furbelle", 2), ("Petcraft", 1)],
    },
)
N_TOPICS = len(TOPICS)
BRANDS_PER_TOPIC = 4


def _lower(words: str) -> str:
    """Lower case inside a sentence, keeping acronyms and model numbers: "GPS Running Watch" -> "GPS running
    watch"."""
    return " ".join(w if w.isupper() or any(c.isdigit() for c in w) else w.lower() for w in words.split())


def _ids(prefix: str, n: int) -> np.ndarray:
    width = max(5, len(str(n - 1)))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def _grouped_choice(
    rng: np.random.Generator, weights: np.ndarray, groups: np.ndarray, members: np.ndarray, picks: np.ndarray
) -> np.ndarray:
    """For each entry of ``picks`` (a group index), draw one of ``members`` from that group with
    probability proportional to ``weights``. ``groups``/``members``/``weights`` list (group, member, weight)
    triples sorted by group; every group drawn from must have positive total weight.

    One searchsorted over a cumulative sum where group g spans [g, g + 1): vectorised over all picks.
    """
    totals = np.bincount(groups, weights=weights)
    share = weights / totals[groups]
    running = np.cumsum(share)
    group_start = np.maximum.accumulate(
        np.where(np.r_[True, groups[1:] != groups[:-1]], np.arange(len(groups)), 0)
    )
    cum = groups + running - (running - share)[group_start]  # group g's entries rise from g to g + 1
    # float rounding may leave the last entry of a group a hair under g + 1
    last = np.r_[groups[1:] != groups[:-1], True]
    cum[last] = groups[last] + 1.0
    u = picks + rng.random(len(picks)) * (1 - 1e-12)
    return members[np.searchsorted(cum, u, side="right")]


def generate_shop(out_dir: str | os.PathLike, scale: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Write ``interactions.parquet``, ``items.parquet`` and ``users.parquet`` under ``out_dir``.

    ``scale`` multiplies customers (2,000 at 1), products (1,500) and purchases (about 50,000). Returns
    ``{"users", "items", "interactions", "scale", "seed", "paths"}``.
    """
    if not scale >= 0.02:
        raise ValueError(f"scale must be at least 0.02 (24 products for 12 topics), got {scale}")
    rng = np.random.default_rng(seed)
    n_users = max(10, round(USERS_PER_SCALE * scale))
    n_items = max(2 * N_TOPICS, round(ITEMS_PER_SCALE * scale))

    # ---- catalogue
    # The first 2 * N_TOPICS products give every topic one main product and one accessory.
    topic = np.concatenate(
        [np.repeat(np.arange(N_TOPICS), 2), rng.integers(0, N_TOPICS, n_items - 2 * N_TOPICS)]
    )
    is_main = np.concatenate(
        [np.tile([True, False], N_TOPICS), rng.random(n_items - 2 * N_TOPICS) < MAIN_SHARE]
    )
    order = rng.permutation(n_items)  # ids carry no information about the topic
    topic, is_main = topic[order], is_main[order]
    brand = rng.integers(0, BRANDS_PER_TOPIC, n_items)
    tier = np.array([[b[1] for b in t["brands"]] for t in TOPICS])[topic, brand]
    noun = np.where(is_main, rng.integers(0, 5, n_items), rng.integers(0, 8, n_items))
    adjective = rng.integers(0, 5, n_items)
    # a main product's use mostly follows its noun ("Dog Bed" -> "large dogs")
    use = np.where(is_main & (rng.random(n_items) < 0.7), noun % 4, rng.integers(0, 4, n_items))
    fits = rng.integers(0, 5, n_items)  # an accessory is made for one kind of main product ("Made for ...")
    model_no = rng.integers(1, 10, n_items)
    tag_pick = np.argsort(rng.random((n_items, 5)), axis=1)[:, :2]
    popularity = rng.lognormal(0.0, 1.1, n_items)
    base_price = np.where(
        is_main, rng.lognormal(np.log(180), 0.5, n_items), rng.lognormal(np.log(18), 0.5, n_items)
    )
    price = np.round(np.maximum(base_price * TIER_PRICE[tier], 2.0)) - 0.01

    sku = _ids("P", n_items)

    # ---- customers: region-tilted tastes (1-3 topics), Dirichlet weights, a segment
    region = rng.integers(0, len(REGIONS), n_users)
    segment = rng.choice(len(SEGMENTS), n_users, p=[0.35, 0.45, 0.2])
    region_prior = rng.dirichlet(np.full(N_TOPICS, 2.0), len(REGIONS))
    gumbel = -np.log(-np.log(rng.random((n_users, N_TOPICS))))
    tastes = np.argsort(-(np.log(region_prior[region]) + gumbel), axis=1)[:, :3]
    n_tastes = rng.choice([1, 2, 3], n_users, p=[0.3, 0.45, 0.25])
    taste_w = rng.gamma(1.5, 1.0, (n_users, 3)) * (np.arange(3)[None, :] < n_tastes[:, None])
    taste_cum = np.cumsum(taste_w / taste_w.sum(axis=1, keepdims=True), axis=1)

    # ---- sessions: at least 3 per customer, the rest by a heavy-tailed activity
    activity = rng.lognormal(0.0, 0.8, n_users)
    extra = round(n_users * (SESSIONS_PER_USER - 3))
    sessions_per_user = 3 + rng.multinomial(extra, activity / activity.sum())
    s_user = np.repeat(np.arange(n_users), sessions_per_user)
    n_sessions = len(s_user)
    start = rng.random(n_users) * DAYS * 0.4
    span = DAYS * 0.6 * rng.beta(2.0, 1.5, n_users)
    s_time = start[s_user] + rng.random(n_sessions) * span[s_user]  # days since START
    by_time = np.lexsort((s_time, s_user))
    s_user, s_time = s_user[by_time], s_time[by_time]

    component = (rng.random(n_sessions)[:, None] > taste_cum[s_user][:, :2]).sum(axis=1)
    s_topic = tastes[s_user, component]
    explore = rng.random(n_sessions) < EXPLORE
    s_topic[explore] = rng.integers(0, N_TOPICS, int(explore.sum()))
    # Half the sessions continue the customer's previous topic: copy from the last non-sticky session.
    first = np.r_[True, s_user[1:] != s_user[:-1]]
    fresh = first | (rng.random(n_sessions) >= STICKY_TOPIC)
    s_topic = s_topic[np.maximum.accumulate(np.where(fresh, np.arange(n_sessions), 0))]

    # ---- the main product of each session: by topic, popularity and the segment's brand tier
    mains = np.flatnonzero(is_main)
    main_groups = (topic[mains][None, :] * len(SEGMENTS) + np.arange(len(SEGMENTS))[:, None]).ravel()
    main_members = np.tile(mains, len(SEGMENTS))
    main_weights = (popularity[mains][None, :] * TIER_AFFINITY[:, tier[mains]]).ravel()
    sort = np.argsort(main_groups, kind="stable")
    s_main = _grouped_choice(
        rng,
        main_weights[sort],
        main_groups[sort],
        main_members[sort],
        s_topic * len(SEGMENTS) + segment[s_user],
    )

    # ---- every main product's linked accessories: same topic, by popularity; those of the same brand 3x and
    # those made for its kind of product ("Made for your trail shoes") 4x as likely
    acc = np.flatnonzero(~is_main)
    n_keys = BRANDS_PER_TOPIC * 5
    key_brand, key_noun = np.divmod(np.arange(n_keys), 5)
    acc_groups = (topic[acc][None, :] * n_keys + np.arange(n_keys)[:, None]).ravel()
    acc_members = np.tile(acc, n_keys)
    acc_weights = (
        popularity[acc][None, :]
        * np.where(brand[acc][None, :] == key_brand[:, None], 3.0, 1.0)
        * np.where(fits[acc][None, :] == key_noun[:, None], 4.0, 1.0)
    ).ravel()
    sort = np.argsort(acc_groups, kind="stable")
    linked = _grouped_choice(
        rng,
        acc_weights[sort],
        acc_groups[sort],
        acc_members[sort],
        np.repeat(topic[mains] * n_keys + brand[mains] * 5 + noun[mains], LINKED_ACCESSORIES),
    ).reshape(len(mains), LINKED_ACCESSORIES)
    del acc_groups, acc_members, acc_weights, sort
    # a main product's description names the accessory it is bought with most
    partner = fits.copy()
    partner[mains] = noun[linked[:, 0]]
    row_of_main = np.full(n_items, -1)
    row_of_main[mains] = np.arange(len(mains))

    n_acc = rng.binomial(MAX_ACCESSORIES_PER_SESSION, ACCESSORY_PROBABILITY, n_sessions)
    a_session = np.repeat(np.arange(n_sessions), n_acc)
    slot_p = 1.0 / np.arange(1, LINKED_ACCESSORIES + 1)
    slot = rng.choice(LINKED_ACCESSORIES, len(a_session), p=slot_p / slot_p.sum())
    a_item = linked[row_of_main[s_main[a_session]], slot]
    a_gap = rng.integers(1, 20, len(a_session)) / (24 * 60)  # minutes after the previous purchase, in days
    a_first = np.repeat(np.cumsum(n_acc) - n_acc, n_acc)  # row of the session's first accessory
    a_rank = np.arange(len(a_session)) - a_first  # 0, 1, .. within the session
    running = np.cumsum(a_gap)
    a_offset = running - (running - a_gap)[a_first]

    e_session = np.concatenate([np.arange(n_sessions), a_session])
    e_item = np.concatenate([s_main, a_item])
    e_time = np.concatenate([s_time, s_time[a_session] + a_offset])
    e_rank = np.concatenate([np.full(n_sessions, -1), a_rank])
    e_qty = np.concatenate([np.ones(n_sessions, np.int64), 1 + rng.binomial(2, 0.2, len(a_session))])
    # the same accessory twice in a session is one purchase
    _, first_seen = np.unique(e_session.astype(np.int64) * n_items + e_item, return_index=True)
    keep = np.zeros(len(e_item), bool)
    keep[first_seen] = True
    e_session, e_item, e_time, e_rank, e_qty = (a[keep] for a in (e_session, e_item, e_time, e_rank, e_qty))
    ts = START + np.round(e_time * 86400).astype("timedelta64[s]")
    log_order = np.lexsort((e_rank, e_session, ts))
    e_user = s_user[e_session][log_order]
    e_item, ts, e_qty = e_item[log_order], ts[log_order], e_qty[log_order]

    names, descriptions, categories, brands, tags = [], [], [], [], []
    for i in range(n_items):
        t = TOPICS[topic[i]]
        brand_name = t["brands"][brand[i]][0]
        adj = t["adjective"][adjective[i]]
        if is_main[i]:
            thing = t["main"][noun[i]]
            link = f"Pairs well with the {_lower(t['accessory'][partner[i]])}."
            role = "Gear"
        else:
            thing = t["accessory"][noun[i]]
            link = f"Made for your {_lower(t['main'][partner[i]])}."
            role = "Accessories"
        names.append(f"{brand_name} {adj} {thing} {'ABCDEFGHJ'[model_no[i] - 1]}{model_no[i]}")
        descriptions.append(f"{adj} {_lower(thing)} for {t['use'][use[i]]}. {TIER_SENTENCE[tier[i]]} {link}")
        categories.append(f"{t['department']} > {t['name']} > {role}")
        brands.append(brand_name)
        tags.append([t["tags"][tag_pick[i, 0]], t["tags"][tag_pick[i, 1]], TIERS[tier[i]]])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    customers = pa.array(_ids("C", n_users), pa.string())
    products = pa.array(sku, pa.string())
    interactions = pa.table(
        {
            "customer": customers.take(pa.array(e_user)),
            "product": products.take(pa.array(e_item)),
            "ts": pa.array(ts, pa.timestamp("s")),
            "qty": pa.array(e_qty, pa.int64()),
        }
    )
    items = pa.table(
        {
            "sku": products,
            "name": pa.array(names, pa.string()),
            "description": pa.array(descriptions, pa.string()),
            "category": pa.array(categories, pa.string()),
            "brand": pa.array(brands, pa.string()),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "price": pa.array(price, pa.float64()),
        }
    )
    users = pa.table(
        {
            "customer": customers,
            "segment": pa.array(np.array(SEGMENTS, dtype=object)[segment], pa.string()),
            "region": pa.array(np.array(REGIONS, dtype=object)[region], pa.string()),
        }
    )
    paths = {name: out / f"{name}.parquet" for name in ("interactions", "items", "users")}
    for name, table in (("interactions", interactions), ("items", items), ("users", users)):
        pq.write_table(table, paths[name])
    return {
        "users": n_users,
        "items": n_items,
        "interactions": interactions.num_rows,
        "scale": scale,
        "seed": seed,
        "paths": {k: str(v) for k, v in paths.items()},
    }


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Write the synthetic shop (examples/shop.yaml's data).")
    parser.add_argument("out_dir", nargs="?", default="out/shop-data")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(generate_shop(args.out_dir, scale=args.scale, seed=args.seed), indent=2))


if __name__ == "__main__":
    main()
