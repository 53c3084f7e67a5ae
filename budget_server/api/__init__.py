"""The gRPC face of the ledger: protobuf in, validated ledger operations, protobuf out."""
