"""gRPC transport: Open Inference Protocol and guard.v1 servicers; protobuf types stay here."""
