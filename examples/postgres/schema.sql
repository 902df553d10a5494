-- A grocery app's tables, with triggers that tell entity-sync what changed.
--
-- Every insert, update and delete sends pg_notify('entity_sync', payload),
-- the payload a JSON array of [entity, id] keys: the changed row's own key,
-- and the keys of the rows that include it (a list's rows include its
-- items, so an item's change is also its list's). PostgreSQL delivers a
-- notification when its transaction commits, and never for a rolled-back one.

CREATE TABLE users (
    id     bigserial PRIMARY KEY,
    name   text NOT NULL,
    secret text NOT NULL UNIQUE  -- what the user's browser sends as its entity-sync secret
);

CREATE TABLE lists (
    id      bigserial PRIMARY KEY,
    name    text NOT NULL,
    private boolean NOT NULL DEFAULT false  -- private: only its readers may see it
);

CREATE TABLE list_readers (
    list_id bigint NOT NULL REFERENCES lists (id) ON DELETE CASCADE,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    PRIMARY KEY (list_id, user_id)
);

CREATE TABLE items (
    id      bigserial PRIMARY KEY,
    list_id bigint NOT NULL REFERENCES lists (id) ON DELETE CASCADE,
    name    text NOT NULL,
    qty     integer NOT NULL DEFAULT 1
);
CREATE INDEX items_list_id ON items (list_id);

-- Sends the keys, at most 100 per notification (a payload must stay under
-- 8,000 bytes).
CREATE FUNCTION entity_sync_notify(keys jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    n int := jsonb_array_length(keys);
    i int := 0;
BEGIN
    WHILE i < n LOOP
        PERFORM pg_notify('entity_sync', (
            SELECT jsonb_agg(k)::text
            FROM jsonb_array_elements(keys) WITH ORDINALITY AS e (k, o)
            WHERE o > i AND o <= i + 100));
        i := i + 100;
    END LOOP;
END $$;

CREATE FUNCTION entity_sync_key(entity text, id bigint) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$ SELECT jsonb_build_array(entity, id::text) $$;

-- An item: items/{id}, and lists/{list_id} (old and new list on a move).
CREATE FUNCTION items_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    keys jsonb := '[]';
BEGIN
    IF TG_OP <> 'INSERT' THEN
        keys := keys || jsonb_build_array(entity_sync_key('items', OLD.id), entity_sync_key('lists', OLD.list_id));
    END IF;
    IF TG_OP <> 'DELETE' THEN
        keys := keys || jsonb_build_array(entity_sync_key('items', NEW.id), entity_sync_key('lists', NEW.list_id));
    END IF;
    PERFORM entity_sync_notify(keys);
    RETURN NULL;
END $$;
CREATE TRIGGER items_changed AFTER INSERT OR UPDATE OR DELETE ON items
    FOR EACH ROW EXECUTE FUNCTION items_changed();

-- A list: lists/{id} (a delete cascades to its items, whose triggers send theirs).
CREATE FUNCTION lists_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM entity_sync_notify(jsonb_build_array(entity_sync_key('lists', COALESCE(NEW.id, OLD.id))));
    RETURN NULL;
END $$;
CREATE TRIGGER lists_changed AFTER INSERT OR UPDATE OR DELETE ON lists
    FOR EACH ROW EXECUTE FUNCTION lists_changed();

-- Who may read a list changed: lists/{list_id} is resolved again for each
-- subscriber's secret, and one no longer allowed is told `forbidden`.
CREATE FUNCTION list_readers_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    keys jsonb := '[]';
BEGIN
    IF TG_OP <> 'INSERT' THEN
        keys := keys || jsonb_build_array(entity_sync_key('lists', OLD.list_id));
    END IF;
    IF TG_OP <> 'DELETE' THEN
        keys := keys || jsonb_build_array(entity_sync_key('lists', NEW.list_id));
    END IF;
    PERFORM entity_sync_notify(keys);
    RETURN NULL;
END $$;
CREATE TRIGGER list_readers_changed AFTER INSERT OR UPDATE OR DELETE ON list_readers
    FOR EACH ROW EXECUTE FUNCTION list_readers_changed();

-- A user's secret changed: every list the user reads is checked again.
CREATE FUNCTION users_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM entity_sync_notify(COALESCE(
        (SELECT jsonb_agg(entity_sync_key('lists', list_id)) FROM list_readers WHERE user_id = OLD.id),
        '[]'));
    RETURN NULL;
END $$;
CREATE TRIGGER users_changed AFTER UPDATE OF secret ON users
    FOR EACH ROW EXECUTE FUNCTION users_changed();
