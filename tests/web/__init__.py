"""Tests of dnsgate.http."""
