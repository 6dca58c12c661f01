function request()
  local items = {}
  for i = 1, per_batch do
    items[i] = '{"reservation_id":"' .. next_id() .. '","action":"commit"}'
  end
  local body = '{"settlements":[' .. table.concat(items, ",") .. ']}'
  return wrk.format("POST", "/v1/reservations/settle", headers, body)
end
