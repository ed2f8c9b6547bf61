"""The shop itself: plain Python rules, no Tornado, motor or aiohttp."""
