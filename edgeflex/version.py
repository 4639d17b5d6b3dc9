"""The edgeflex version, in a module of its own so that every stage can record it without importing the
package's public API (a later stage)."""

__version__ = "0.1.0"
