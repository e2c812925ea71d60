"""Drives a running semcache with the official LangCache and OpenAI Python SDKs, unchanged.

Usage: python check_sdks.py http://127.0.0.1:PORT
Exits non-zero (with the failing assertion) if any call misbehaves.
"""
import math
import sys

from langcache import LangCache
from langcache.models import SearchStrategy
from openai import OpenAI

url = sys.argv[1]


def check_langcache():
    with LangCache(server_url=url, cache_id="sdk-cache") as lang:
        first = lang.set(prompt="What is the capital of France?", response="Paris",
                         attributes={"tenant": "acme"})
        assert len(first.entry_id) == 32, first
        second = lang.set(prompt="How do I reverse a list in Python?", response="lst[::-1]",
                          attributes={"tenant": "other"}, ttl_millis=60_000)

        exact = lang.search(prompt="what is the capital of france?",
                            search_strategies=[SearchStrategy.EXACT])
        assert len(exact.data) == 1 and exact.data[0].id == first.entry_id, exact
        assert exact.data[0].search_strategy == SearchStrategy.EXACT
        assert exact.data[0].similarity == 1.0

        semantic = lang.search(prompt="Tell me the capital city of France.",
                               similarity_threshold=0.85,
                               search_strategies=[SearchStrategy.SEMANTIC],
                               attributes={"tenant": "acme"})
        assert len(semantic.data) == 1, semantic
        hit = semantic.data[0]
        assert hit.id == first.entry_id and hit.response == "Paris"
        assert hit.search_strategy == SearchStrategy.SEMANTIC and 0.85 <= hit.similarity < 1.0
        assert hit.attributes == {"tenant": "acme"}

        scoped = lang.search(prompt="Tell me the capital city of France.",
                             similarity_threshold=0.85, attributes={"tenant": "other"})
        assert scoped.data == [], scoped

        lang.delete_by_id(entry_id=first.entry_id)
        gone = lang.search(prompt="What is the capital of France?")
        assert gone.data == [], gone

        deleted = lang.delete_query(attributes={"tenant": "other"})
        assert deleted.deleted_entries_count == 1, deleted

        lang.set(prompt="Name a prime number", response="7")
        assert len(lang.search(prompt="Name a prime number").data) == 1
        lang.flush()
        assert lang.search(prompt="Name a prime number").data == []
        _ = second


def check_openai():
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    # The SDK asks for base64 by default and decodes it itself.
    result = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2",
                                      input=["hello world", "bonjour le monde"])
    assert len(result.data) == 2 and result.data[1].index == 1
    vector = result.data[0].embedding
    assert len(vector) == 384
    assert abs(math.sqrt(sum(x * x for x in vector)) - 1.0) < 1e-4
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input="hello world",
                                      encoding_format="float")
    cosine = sum(a * b for a, b in zip(vector, floats.data[0].embedding))
    assert cosine > 0.9999, cosine
    assert result.usage.prompt_tokens > 0


check_langcache()
check_openai()
print("langcache and openai SDKs: all checks passed")
