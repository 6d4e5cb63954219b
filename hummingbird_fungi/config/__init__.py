"""Configuration: YAML presets with dotted `key=value` overrides, turned into typed, validated sections."""
