"""Helpers the tests share: stub upstream, redis-server, network namespaces, fixtures."""
