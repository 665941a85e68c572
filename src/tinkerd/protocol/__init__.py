"""Wire types and codecs for the Tinker protocol (JSON and the SDK's protobuf). No torch."""
