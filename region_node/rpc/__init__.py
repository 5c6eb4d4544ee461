"""The internal gRPC API between region nodes (generated code: region_pb2*.py, `make proto`)."""
