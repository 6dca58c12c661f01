function request()
  local items = {}
  for i = 1, per_batch do
    items[i] = '{"coach_id":"' .. coach() .. '","feature":"checkin_draft"}'
  end
  local body = '{"reservations":[' .. table.concat(items, ",") .. ']}'
  return wrk.format("POST", "/v1/reservations/batch", headers, body)
end
