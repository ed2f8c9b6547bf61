"""One client class per upstream service: the only way services talk to each other."""
