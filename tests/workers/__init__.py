"""Tests of dnsgate.workers (dns.workers > 1)."""
