-- Command log: every downlink command and each of its state changes.
CREATE TABLE commands (
    id          uuid PRIMARY KEY,
    phy_id      text NOT NULL,
    name        text NOT NULL,
    payload     bytea NOT NULL,
    status      text NOT NULL,
    reason      text,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    expires_at  timestamptz
);

CREATE INDEX commands_phy_created_idx ON commands (phy_id, created_at DESC);
CREATE INDEX commands_status_created_idx ON commands (status, created_at DESC);

CREATE TABLE command_events (
    command_id uuid NOT NULL,
    status     text NOT NULL,
    at         timestamptz NOT NULL,
    detail     jsonb,
    PRIMARY KEY (command_id, status, at)
);
